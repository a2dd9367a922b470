"""
Settings of DAG-run batching: the ``[dagrun_batching]`` section of ``airflow.cfg``.

:data:`CONFIG_SECTION` declares every option once, in the format of ``get_provider_info()["config"]``.
:func:`load_batching_settings` reads its defaults from the same table, so a process that has not
loaded provider configuration resolves the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kestra_perf_provider.config import ConfigSection

SECTION = "dagrun_batching"

CONFIG_SECTION: dict[str, Any] = {
    "description": (
        "Batching of task-state updates by DAG run, used by "
        "kestra_perf_provider.executors.BatchingLocalExecutor."
    ),
    "options": {
        "enabled": {
            "description": (
                "Apply the success updates of task instances in one transaction per DAG run. When False, "
                "the executor behaves exactly like LocalExecutor."
            ),
            "version_added": "0.1.0",
            "type": "boolean",
            "example": "False",
            "default": "True",
        },
        "max_batch_size": {
            "description": (
                "Largest number of task-state updates of one DAG run applied in one transaction. A group "
                "that reaches this size is applied at once, without waiting for linger_ms."
            ),
            "version_added": "0.1.0",
            "type": "integer",
            "example": "128",
            "default": "64",
        },
        "linger_ms": {
            "description": (
                "Longest time, in milliseconds, an update waits for more updates of the same DAG run "
                "before its group is applied. 0 applies every group as soon as it can."
            ),
            "version_added": "0.1.0",
            "type": "integer",
            "example": "50",
            "default": "20",
        },
        "max_concurrent_groups": {
            "description": (
                "Largest number of groups (each of a different DAG run) applied at the same time. Each "
                "group in flight holds one database connection of the scheduler process."
            ),
            "version_added": "0.1.0",
            "type": "integer",
            "example": "8",
            "default": "4",
        },
        "fallback_timeout": {
            "description": (
                "Seconds a task's supervisor waits for its batched update to be applied. After that, or "
                "at once if the scheduler process is gone, it sends its own state update to the API "
                "server as stock Airflow does."
            ),
            "version_added": "0.1.0",
            "type": "float",
            "example": "30",
            "default": "15",
        },
        "fold_task_writes": {
            "description": (
                "Hold a task's rendered template fields and its return-value XCom in its supervisor and "
                "write them in the transaction that applies its success, instead of one API request "
                "and transaction each. Downstream tasks see the XCom with the success, as before. The "
                "UI shows a running task's rendered fields up to max_write_hold_ms later than stock "
                "Airflow does. Writes are sent as stock Airflow sends them, in their original order, "
                "before any other request of the task, and whenever the task does not end in a "
                "batched success."
            ),
            "version_added": "0.1.0",
            "type": "boolean",
            "example": "False",
            "default": "True",
        },
        "max_write_hold_ms": {
            "description": (
                "Longest time, in milliseconds, a held write (see fold_task_writes) waits for the task "
                "to succeed before the supervisor sends it on its own."
            ),
            "version_added": "0.1.0",
            "type": "integer",
            "example": "3000",
            "default": "1000",
        },
        "xcom_read_ahead": {
            "description": (
                "Number of a mapped task's results a supervisor fetches in one request when its task "
                "reads them one by one, as a fan-in task iterating over them does. The stock task "
                "sends one request per result. The supervisor keeps one window per mapped task it "
                "reads, for up to 8 of them at once. 0 sends one request per result."
            ),
            "version_added": "0.1.0",
            "type": "integer",
            "example": "0",
            "default": "64",
        },
        "skip_start_heartbeat": {
            "description": (
                "Answer the heartbeat a supervisor sends right after its task starts without a request: "
                "the start request (PATCH /run) has just recorded the same heartbeat. Later heartbeats, "
                "every [workers] min_heartbeat_interval, are sent as before."
            ),
            "version_added": "0.1.0",
            "type": "boolean",
            "example": "False",
            "default": "True",
        },
    },
}


@dataclass(frozen=True)
class BatchingSettings:
    """Resolved and validated ``[dagrun_batching]`` settings."""

    enabled: bool
    max_batch_size: int
    linger_ms: int
    max_concurrent_groups: int
    fallback_timeout: float
    fold_task_writes: bool = True
    max_write_hold_ms: int = 1000
    skip_start_heartbeat: bool = True
    xcom_read_ahead: int = 64

    @property
    def linger_seconds(self) -> float:
        """``linger_ms`` in seconds."""
        return self.linger_ms / 1000.0

    @property
    def max_write_hold_seconds(self) -> float:
        """``max_write_hold_ms`` in seconds."""
        return self.max_write_hold_ms / 1000.0


def _config_error(message: str) -> Exception:
    # Imported here: get_provider_info() imports this module while Airflow itself is still importing,
    # and the exception's base class lives in Airflow.
    from kestra_perf_provider.dagrun_batching.exceptions import DagRunBatchingConfigError

    return DagRunBatchingConfigError(message)


_SECTION = ConfigSection(SECTION, CONFIG_SECTION, _config_error)


def _read_option(option: str, config: Any) -> Any:
    if config is None:
        from airflow.configuration import conf as config
    return _SECTION.read(option, config=config)


_parse_bool = _SECTION.parse_bool
_parse_int = _SECTION.parse_int


def _parse_float(option: str, value: Any, minimum: float, maximum: float) -> float:
    return _SECTION.parse_float(option, value, minimum, maximum, unit="a number of seconds")


def load_batching_settings(config: Any = None) -> BatchingSettings:
    """
    Resolve and validate the ``[dagrun_batching]`` settings.

    :param config: an ``AirflowConfigParser``; ``airflow.configuration.conf`` when omitted.
    :raises DagRunBatchingConfigError: a value has the wrong type or range; the message names the
        option, the value and where to fix it.
    """
    return BatchingSettings(
        enabled=_parse_bool("enabled", _read_option("enabled", config)),
        max_batch_size=_parse_int("max_batch_size", _read_option("max_batch_size", config), 1, 10_000),
        # An hour bounds linger_ms: a longer wait would stall every task of the run behind it.
        linger_ms=_parse_int("linger_ms", _read_option("linger_ms", config), 0, 3_600_000),
        max_concurrent_groups=_parse_int(
            "max_concurrent_groups", _read_option("max_concurrent_groups", config), 1, 1_000
        ),
        fallback_timeout=_parse_float(
            "fallback_timeout", _read_option("fallback_timeout", config), 0.1, 3_600.0
        ),
        fold_task_writes=_parse_bool("fold_task_writes", _read_option("fold_task_writes", config)),
        # A minute bounds the hold: the rendered fields are what a user debugging a running task reads.
        max_write_hold_ms=_parse_int(
            "max_write_hold_ms", _read_option("max_write_hold_ms", config), 0, 60_000
        ),
        skip_start_heartbeat=_parse_bool(
            "skip_start_heartbeat", _read_option("skip_start_heartbeat", config)
        ),
        # The window lives in the supervisor's memory, so its number of values is capped.
        xcom_read_ahead=_parse_int("xcom_read_ahead", _read_option("xcom_read_ahead", config), 0, 10_000),
    )
