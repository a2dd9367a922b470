"""``@task.namespace_files``: a Python task that runs inside its staged namespace files."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk.bases.decorator import task_decorator_factory

from kestra_perf_provider.namespace_files.mixin import NamespaceFilesMixin

if TYPE_CHECKING:
    from airflow.sdk.bases.decorator import TaskDecorator


class NamespaceFilesPythonOperator(NamespaceFilesMixin, _PythonDecoratedOperator):
    """The operator behind ``@task.namespace_files``: a ``@task`` callable with staged files."""

    custom_operator_name = "@task.namespace_files"


def namespace_files_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """
    Wrap a function into a task that stages namespace files first and runs in their folder.

    Takes the arguments of :class:`NamespaceFilesMixin` (``namespaces``, ``namespace_include``, ...)
    besides those of ``@task``. The function runs with the staged folder as its current directory;
    a parameter named ``namespace_files_dir`` (give it a default of ``None``) receives its path.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=NamespaceFilesPythonOperator,
        **kwargs,
    )
