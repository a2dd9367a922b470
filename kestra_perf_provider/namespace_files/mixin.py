"""
:class:`NamespaceFilesMixin`: stage namespace files before any operator's ``execute()``.

Combine it in front of an operator class::

    class StagedBashOperator(NamespaceFilesMixin, BashOperator):
        pass

    StagedBashOperator(
        task_id="report",
        namespaces=["s3://bucket/ns/shared", "s3://bucket/ns/team-a"],
        namespace_include=["scripts/**", "*.sql"],
        bash_command="python scripts/report.py",
    )
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kestra_perf_provider.exceptions import InvalidNamespaceError, NamespaceFilesConfigError
from kestra_perf_provider.namespace_files.planning import IfExists, PathFilter
from kestra_perf_provider.namespace_files.settings import load_settings
from kestra_perf_provider.namespace_files.cache import PLACEMENTS
from kestra_perf_provider.namespace_files.sources import check_folders, coerce_namespaces
from kestra_perf_provider.namespace_files.staging import StagingResult, stage_namespace_files

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

NAMESPACE_TEMPLATE_FIELDS = ("namespaces", "namespace_include", "namespace_exclude", "namespace_working_dir")
CONTEXT_KEY = "namespace_files_dir"


def _is_templated(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, dict):
        return any(_is_templated(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_is_templated(item) for item in value)
    return False


def _check_task_arguments(parallel_downloads: Any, placement: Any) -> None:
    if parallel_downloads is not None and (
        isinstance(parallel_downloads, bool)
        or not isinstance(parallel_downloads, (int, float))
        or (isinstance(parallel_downloads, int) and parallel_downloads < 1)
        or (isinstance(parallel_downloads, float) and not 0 < parallel_downloads <= 1)
    ):
        raise NamespaceFilesConfigError(
            f"Invalid namespace_parallel_downloads={parallel_downloads!r}: expected a fraction of the host "
            "budget in (0, 1] such as 0.5, or a whole number of downloads >= 1 such as 8."
        )
    if placement is not None and placement not in PLACEMENTS:
        raise NamespaceFilesConfigError(
            f"Invalid namespace_cache_placement={placement!r}: expected one of {', '.join(PLACEMENTS)}."
        )


def _staged(execute: Any) -> Any:
    """Wrap ``execute`` so that the outermost call stages the files first; nested super() calls don't."""

    @functools.wraps(execute)
    def wrapper(self: NamespaceFilesMixin, context: Context, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_namespace_files_staging"):
            return execute(self, context, *args, **kwargs)
        self.__dict__["_namespace_files_staging"] = True
        try:
            return self._execute_with_namespace_files(execute, context, *args, **kwargs)
        finally:
            self.__dict__["_namespace_files_staging"] = False

    return wrapper


class NamespaceFilesMixin:
    """
    Stage the files of one or more namespaces into the task's working directory before ``execute()``.

    The working directory becomes the process's current directory while ``execute()`` runs, its path
    is added to the task context as ``namespace_files_dir``, and operators with a ``cwd`` attribute
    (``BashOperator``) run their command there. Argument names carry a ``namespace_`` prefix, which
    keeps them apart from arguments such as ``include`` or ``if_exists`` of the combined operator.

    :param namespaces: one or more namespace roots (templated): fsspec URLs, :class:`Namespace`
        objects or mappings with ``url``, ``conn_id``, ``storage_options`` and ``folder``. A later
        namespace overrides an earlier one on the same relative path.
    :param namespace_include: glob patterns of files to stage (templated); default every file
        outside dot-folders. Semantics: :mod:`kestra_perf_provider.namespace_files.planning`.
    :param namespace_exclude: glob patterns of files to leave out (templated).
    :param namespace_if_exists: ``overwrite`` (default), ``skip``, ``warn`` or ``fail`` when a file is
        already in the working directory.
    :param folder_per_namespace: stage each namespace into a subfolder named after its last path
        segment (or its ``folder``) instead of merging them.
    :param namespace_working_dir: folder to stage into and run in (templated); kept after the task.
        When unset, each try gets a fresh folder under ``[namespace_files] working_dir_root`` that
        is removed after ``execute()`` unless ``keep_namespace_working_dir`` is set.
    :param keep_namespace_working_dir: keep the fresh per-try folder, for debugging.
    :param namespace_parallel_downloads: per-task cap for this task only; a float is a fraction of the
        host budget, an int a number of downloads.
    :param namespace_cache: use the host's namespace-file cache (default: ``[namespace_files]
        cache_enabled``).
    :param namespace_cache_placement: ``auto``, ``copy`` or ``hardlink`` for this task (default:
        ``[namespace_files] cache_placement``). Set ``copy`` on a task that modifies its files
        when the host default is ``hardlink``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "execute" in cls.__dict__:
            # A subclass's own execute() would run instead of the mixin's, so staging wraps
            # whichever execute() the class defines.
            cls.execute = _staged(cls.__dict__["execute"])  # type: ignore[method-assign]
        fields = tuple(getattr(cls, "template_fields", ()))
        cls.template_fields = fields + tuple(name for name in NAMESPACE_TEMPLATE_FIELDS if name not in fields)
        if cls.__init__ is NamespaceFilesMixin.__init__:
            # BaseOperatorMeta wraps __init__ with apply_defaults only when the class's __init__
            # differs from its first base's. The mixin is that first base, so the combined class
            # gets an __init__ of its own for the metaclass to wrap.
            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                super(cls, self).__init__(*args, **kwargs)  # type: ignore[misc]

            __init__.__qualname__ = f"{cls.__qualname__}.__init__"
            cls.__init__ = __init__  # type: ignore[method-assign]

    def __init__(
        self,
        *,
        namespaces: Any,
        namespace_include: Sequence[str] | str | None = None,
        namespace_exclude: Sequence[str] | str | None = None,
        namespace_if_exists: IfExists | str = IfExists.OVERWRITE,
        folder_per_namespace: bool = False,
        namespace_working_dir: str | os.PathLike[str] | None = None,
        keep_namespace_working_dir: bool = False,
        namespace_parallel_downloads: int | float | None = None,
        namespace_cache: bool | None = None,
        namespace_cache_placement: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.namespaces = namespaces
        self.namespace_include = namespace_include
        self.namespace_exclude = namespace_exclude
        self.folder_per_namespace = folder_per_namespace
        self.namespace_working_dir = None if namespace_working_dir is None else str(namespace_working_dir)
        self.keep_namespace_working_dir = keep_namespace_working_dir
        self.namespace_parallel_downloads = namespace_parallel_downloads
        self.namespace_cache = namespace_cache
        self.namespace_cache_placement = namespace_cache_placement
        self.namespace_files_dir: Path | None = None
        self.namespace_files_result: StagingResult | None = None
        task = getattr(self, "task_id", type(self).__name__)
        try:
            # Checking at parse time turns a typo into a DAG import error instead of a failed run.
            self.namespace_if_exists = IfExists.parse(namespace_if_exists)
            _check_task_arguments(namespace_parallel_downloads, namespace_cache_placement)
            if not _is_templated(namespaces):
                resolved = coerce_namespaces(namespaces)
                if folder_per_namespace:
                    check_folders(resolved)
            for patterns in (namespace_include, namespace_exclude):
                if not _is_templated(patterns):
                    PathFilter(patterns)
        except (NamespaceFilesConfigError, InvalidNamespaceError) as err:
            raise type(err)(f"Task {task!r}: {err}") from err

    def execute(self, context: Context) -> Any:
        return super().execute(context)  # type: ignore[misc]

    def _execute_with_namespace_files(self, execute: Any, context: Context, *args: Any, **kwargs: Any) -> Any:
        settings = load_settings(
            task_parallel_downloads=self.namespace_parallel_downloads,
            cache_enabled=self.namespace_cache,
            cache_placement=self.namespace_cache_placement,
        )
        directory, temporary = self._make_working_dir(context, settings.working_dir_root)
        previous = os.getcwd()
        try:
            self.namespace_files_result = stage_namespace_files(
                self.namespaces,
                directory,
                include=self.namespace_include,
                exclude=self.namespace_exclude,
                if_exists=self.namespace_if_exists,
                folder_per_namespace=self.folder_per_namespace,
                settings=settings,
            )
            self.namespace_files_dir = directory
            context[CONTEXT_KEY] = str(directory)  # type: ignore[literal-required]
            self.on_namespace_files_staged(directory, context)
            os.chdir(directory)
            return execute(self, context, *args, **kwargs)
        finally:
            os.chdir(previous)
            if temporary and not self.keep_namespace_working_dir:
                shutil.rmtree(directory, ignore_errors=True)

    def on_namespace_files_staged(self, directory: Path, context: Context) -> None:
        """
        Point the operator at the staged working directory; override to do more.

        The default sets ``cwd`` on operators that have one, such as ``BashOperator``.
        """
        if hasattr(self, "cwd"):
            self.cwd = str(directory)

    def _make_working_dir(self, context: Context, root: Path) -> tuple[Path, bool]:
        if self.namespace_working_dir:
            # Absolute, because the operator later runs there from a changed current directory.
            # Staging creates it once the plan succeeds.
            return Path(self.namespace_working_dir).expanduser().absolute(), False
        root.mkdir(parents=True, exist_ok=True)
        ti = context.get("ti")
        parts = [getattr(self, "dag_id", None), getattr(self, "task_id", None)]
        if ti is not None:
            parts += [getattr(ti, "map_index", -1), getattr(ti, "try_number", 0)]
        prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(part) for part in parts if part is not None))
        return Path(tempfile.mkdtemp(prefix=f"airflow-nsf-{prefix[:80]}-", dir=root)), True


NamespaceFilesMixin.execute = _staged(NamespaceFilesMixin.execute)  # type: ignore[method-assign]
