"""
Namespace files: stage the files of object-storage prefixes into a task's working directory.

Public API: :class:`NamespaceFilesMixin` for operators, ``@task.namespace_files`` for Python tasks,
:func:`stage_namespace_files` for direct calls, and :class:`Namespace` to name a root. The decorator
is imported lazily because it needs the standard provider's Python operator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kestra_perf_provider.namespace_files.mixin import NamespaceFilesMixin
from kestra_perf_provider.namespace_files.planning import IfExists, PathFilter
from kestra_perf_provider.namespace_files.sources import Namespace
from kestra_perf_provider.namespace_files.staging import StagingResult, stage_namespace_files

if TYPE_CHECKING:
    from kestra_perf_provider.namespace_files.decorators import namespace_files_task

__all__ = [
    "IfExists",
    "Namespace",
    "NamespaceFilesMixin",
    "PathFilter",
    "StagingResult",
    "namespace_files_task",
    "stage_namespace_files",
]


def __getattr__(name: str) -> Any:
    if name == "namespace_files_task":
        from kestra_perf_provider.namespace_files.decorators import namespace_files_task

        return namespace_files_task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
