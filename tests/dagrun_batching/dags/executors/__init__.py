"""
Subclasses of ``BatchingLocalExecutor`` that the end-to-end tests select through ``[core] executor``.

They use the executor's two seams, ``fault_injector()`` and ``airflow_version()``, and are read from
the repository by the scheduler (the harness puts the repository root on ``PYTHONPATH``). The
``.airflowignore`` beside this package keeps the dag-processor from parsing it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from sqlalchemy.exc import OperationalError

from kestra_perf_provider.executors import BatchingLocalExecutor

MARKER_DIR_ENV = "KPP_TEST_MARKER_DIR"
"""Folder where :class:`SlowApplyExecutor` writes one file per held group."""

HOLD_SECONDS_ENV = "KPP_TEST_HOLD_SECONDS"
"""Seconds :class:`SlowApplyExecutor` holds each group's first attempt."""


class _InjectedDeadlock(Exception):
    """Stands for psycopg2's DeadlockDetected inside the injected OperationalError."""


def _deadlock(stage: str) -> OperationalError:
    return OperationalError(f"injected at {stage}", {}, _InjectedDeadlock("deadlock detected (injected)"))


class DeadlockOnceExecutor(BatchingLocalExecutor):
    """Every group's first attempt fails just before its commit, as a deadlock would make it."""

    def fault_injector(self):
        def inject(stage: str, attempt: int) -> None:
            if stage == "before_commit" and attempt == 1:
                raise _deadlock(stage)

        return inject


class AlwaysFailingExecutor(BatchingLocalExecutor):
    """Every attempt of every group fails, so every update falls back to the API server."""

    def fault_injector(self):
        def inject(stage: str, attempt: int) -> None:
            if stage == "before_commit":
                raise _deadlock(stage)

        return inject


class SlowApplyExecutor(BatchingLocalExecutor):
    """Each group's first attempt waits before touching the database, so updates stay pending."""

    def fault_injector(self):
        marker_dir = Path(os.environ[MARKER_DIR_ENV])
        hold = float(os.environ.get(HOLD_SECONDS_ENV, "5"))
        counter = iter(range(1_000_000))
        lock = threading.Lock()

        def inject(stage: str, attempt: int) -> None:
            if stage == "begin" and attempt == 1:
                with lock:
                    index = next(counter)
                (marker_dir / f"held-{os.getpid()}-{index}").write_text(str(time.time()))
                time.sleep(hold)

        return inject


class FutureAirflowExecutor(BatchingLocalExecutor):
    """Reports an Airflow version outside the tested series, so the gate turns batching off."""

    def airflow_version(self) -> str:
        return "3.4.0"
