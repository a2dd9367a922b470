"""
Namespace files: stage the files of object-storage prefixes into a task's working directory.

Public API: :class:`NamespaceFilesMixin` for operators, ``@task.namespace_files`` for Python tasks,
:func:`stage_namespace_files` for direct calls, and :class:`Namespace` to name a root.

Names are imported on first use: ``get_provider_info()`` reads :mod:`.settings` while Airflow is
still loading its configuration, when importing the operator modules would be circular.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kestra_perf_provider.namespace_files.decorators import namespace_files_task
    from kestra_perf_provider.namespace_files.mixin import NamespaceFilesMixin
    from kestra_perf_provider.namespace_files.planning import IfExists, PathFilter
    from kestra_perf_provider.namespace_files.sources import Namespace
    from kestra_perf_provider.namespace_files.staging import StagingResult, stage_namespace_files

_EXPORTS = {
    "IfExists": "planning",
    "Namespace": "sources",
    "NamespaceFilesMixin": "mixin",
    "PathFilter": "planning",
    "StagingResult": "staging",
    "namespace_files_task": "decorators",
    "stage_namespace_files": "staging",
}

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
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
