"""
Exceptions of DAG-run batching.

Every class takes a single message, so instances pickle and cross process boundaries unchanged.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class DagRunBatchingError(AirflowException):
    """Base class of DAG-run batching errors."""


class DagRunBatchingConfigError(DagRunBatchingError, ValueError):
    """An option of ``[dagrun_batching]`` has an invalid value."""


class TransportError(DagRunBatchingError, ConnectionError):
    """A state update could not be handed to the coalescer or its outcome was not received."""
