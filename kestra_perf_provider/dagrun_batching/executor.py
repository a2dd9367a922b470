"""
``BatchingLocalExecutor``: a LocalExecutor that applies task success updates in one transaction per DAG run.

Select it with ``[core] executor = kestra_perf_provider.executors.BatchingLocalExecutor``. In the
scheduler process it runs a :class:`~.transport.UnixSocketReceiver`, a :class:`~.coalescing.Coalescer`
and a :class:`~.applying.GroupApplier` with its own small connection pool; its worker processes run
:func:`~.worker.run_batching_worker`. When batching cannot be used (the option is off, the Airflow
version is not one it was tested on, or the metadata database is not PostgreSQL) it logs one warning
and is LocalExecutor, unchanged.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING

from airflow.executors.local_executor import LocalExecutor

from kestra_perf_provider.dagrun_batching.applying import FaultInjector, GroupApplier
from kestra_perf_provider.dagrun_batching.coalescing import Coalescer
from kestra_perf_provider.dagrun_batching.metrics import StatsMetrics
from kestra_perf_provider.dagrun_batching.settings import BatchingSettings, load_batching_settings
from kestra_perf_provider.dagrun_batching.transport import UnixSocketReceiver, UnixSocketSender
from kestra_perf_provider.dagrun_batching.worker import run_batching_worker

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

TESTED_AIRFLOW_SERIES: tuple[str, ...] = ("3.3",)
"""
``major.minor`` series of Airflow that batching was tested on. The applier repeats what the execution
API's ``PATCH /state`` does for a success in these versions, and the worker replaces LocalExecutor's
worker loop of these versions; either may change in another series.
"""

# Seconds end() waits for groups in flight before their updates fall back.
_STOP_TIMEOUT_SECONDS = 30.0

SOCKET_DIR_PREFIX = "airflow-dagrun-batching-"
"""Prefix of the private temporary folder that contains a scheduler's update socket and its pid file."""

_PID_FILE = "scheduler.pid"


def remove_stale_socket_dirs(parent: str | None = None) -> list[str]:
    """
    Remove the socket folders of schedulers that are gone, and return their paths.

    A scheduler removes its own folder when it stops, but not when it is killed. A folder whose pid
    file names a process that no longer exists is stale. A folder without a readable pid file (another
    user's, or one whose scheduler is still creating it) is left alone.
    """
    removed = []
    for path in glob.glob(os.path.join(parent or tempfile.gettempdir(), f"{SOCKET_DIR_PREFIX}*")):
        try:
            with open(os.path.join(path, _PID_FILE)) as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if _process_exists(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's process.
    return True


def batching_supported(airflow_version: str) -> bool:
    """Tell whether ``airflow_version`` (such as ``"3.3.2"``) is in a tested series."""
    parts = airflow_version.split(".")
    return len(parts) >= 2 and f"{parts[0]}.{parts[1]}" in TESTED_AIRFLOW_SERIES


class BatchingLocalExecutor(LocalExecutor):
    """
    LocalExecutor whose task success updates are grouped by DAG run and applied in one transaction each.

    With ``fold_task_writes``, a task's rendered fields and return-value XCom commit with its success.
    Failed, up-for-retry, deferred, rescheduled and every other transition, other XComs and later
    heartbeats take the stock API path. See ``docs/dagrun_batching.md``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batching_settings: BatchingSettings | None = None
        self.batching_active = False
        self._coalescer: Coalescer | None = None
        self._receiver: UnixSocketReceiver | None = None
        self._sender: UnixSocketSender | None = None
        self._apply_engine: Engine | None = None
        self._socket_dir: str | None = None

    # -- seams ---------------------------------------------------------------------------------

    def airflow_version(self) -> str:
        """Return the Airflow version the gate checks; a subclass may override it to test the gate."""
        import airflow

        return airflow.__version__

    def fault_injector(self) -> FaultInjector | None:
        """Return the applier's fault injector; ``None`` in production, overridden by tests."""
        return None

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and, when batching is possible, the receiver, coalescer and applier."""
        self.batching_active = self._check_batching_possible()
        if not self.batching_active:
            super().start()
            return

        assert self.batching_settings is not None
        # The socket path must be known before the workers are forked, but the socket is served only
        # afterwards, so no worker inherits it. A worker that finishes a task before the receiver runs
        # finds no socket and sends its update to the API server.
        for stale in remove_stale_socket_dirs():
            self.log.info("Removed the socket folder of a scheduler that is gone: %s", stale)
        self._socket_dir = tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX)
        with open(os.path.join(self._socket_dir, _PID_FILE), "w") as handle:
            handle.write(str(os.getpid()))
        self._sender = UnixSocketSender(os.path.join(self._socket_dir, "updates.sock"))
        super().start()

        settings = self.batching_settings
        self._apply_engine = _create_apply_engine(settings.max_concurrent_groups)
        metrics = StatsMetrics()
        session_factory = _session_factory(self._apply_engine)
        applier = GroupApplier(session_factory, metrics=metrics, fault_injector=self.fault_injector())
        self._coalescer = Coalescer(
            applier,
            max_batch_size=settings.max_batch_size,
            linger_seconds=settings.linger_seconds,
            max_concurrent_groups=settings.max_concurrent_groups,
            metrics=metrics,
        )
        self._coalescer.start()
        self._receiver = UnixSocketReceiver(self._sender.path, self._coalescer.submit)
        self._receiver.start()
        self.log.info(
            "DAG-run batching is on: max_batch_size=%s linger_ms=%s max_concurrent_groups=%s "
            "fallback_timeout=%s socket=%s",
            settings.max_batch_size,
            settings.linger_ms,
            settings.max_concurrent_groups,
            settings.fallback_timeout,
            self._sender.path,
        )

    def end(self) -> None:
        """Wait for running tasks as LocalExecutor does, then apply what is queued and stop batching."""
        # Workers finish their running tasks inside super().end(), and their updates still need the
        # coalescer, so batching stops only after it returns.
        try:
            if self._workers_started():
                super().end()
        finally:
            self._stop_batching(_STOP_TIMEOUT_SECONDS)

    def terminate(self) -> None:
        """Stop batching at once; queued updates fall back to the API server."""
        if self._workers_started():
            super().terminate()
        self._stop_batching(0.0)

    def _workers_started(self) -> bool:
        # start() raises before LocalExecutor.start() on invalid [dagrun_batching] settings, and the
        # scheduler still calls end(); LocalExecutor's end() would then hide that error behind its own.
        return hasattr(self, "workers")

    def _spawn_worker(self) -> None:
        if not self.batching_active:
            super()._spawn_worker()
            return
        assert self.batching_settings is not None
        # Same arguments as LocalExecutor._spawn_worker in Airflow 3.3, plus the transport.
        process = multiprocessing.Process(
            target=run_batching_worker,
            kwargs={
                "logger_name": self.log.name,
                "input": self.activity_queue,
                "output": self.result_queue,
                "unread_messages": self._unread_messages,
                "team_conf": self.conf,
                "sender": self._sender,
                "settings": self.batching_settings,
            },
        )
        process.start()
        assert process.pid
        self.workers[process.pid] = process

    # -- helpers -------------------------------------------------------------------------------

    def _check_batching_possible(self) -> bool:
        self.batching_settings = load_batching_settings()
        if not self.batching_settings.enabled:
            self.log.info(
                "DAG-run batching is off ([dagrun_batching] enabled = False); running as LocalExecutor"
            )
            return False
        version = self.airflow_version()
        if not batching_supported(version):
            self.log.warning(
                "DAG-run batching is off: Airflow %s is not in a tested series (%s); running as "
                "LocalExecutor. Use a provider release tested on this Airflow version to batch updates.",
                version,
                ", ".join(f"{series}.x" for series in TESTED_AIRFLOW_SERIES),
            )
            return False
        from airflow import settings as airflow_settings
        from sqlalchemy.engine import make_url

        backend = make_url(airflow_settings.SQL_ALCHEMY_CONN).get_backend_name()
        if backend != "postgresql":
            self.log.warning(
                "DAG-run batching is off: the metadata database is %s, and batching supports only "
                "postgresql; running as LocalExecutor.",
                backend,
            )
            return False
        return True

    def _stop_batching(self, timeout: float) -> None:
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None
        if self._coalescer is not None:
            self._coalescer.stop(timeout)
            statistics = self._coalescer.statistics()
            mean_latency = statistics.mean_flush_latency_ms
            self.log.info(
                "DAG-run batching stopped: groups=%s committed_groups=%s updates=%s outcomes=%s "
                "max_group_size=%s max_groups_in_flight=%s mean_flush_latency_ms=%s mean_apply_ms=%s",
                statistics.groups_applied,
                statistics.groups_committed,
                statistics.updates_submitted,
                {kind.value: count for kind, count in statistics.outcomes.items()},
                statistics.max_group_size,
                statistics.max_groups_in_flight,
                None if mean_latency is None else round(mean_latency, 1),
                None if statistics.mean_apply_ms is None else round(statistics.mean_apply_ms, 1),
            )
            self._coalescer = None
        if self._apply_engine is not None:
            self._apply_engine.dispose()
            self._apply_engine = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


def _create_apply_engine(pool_size: int) -> Engine:
    """
    Create the applier's engine: the scheduler's engine settings with a pool of ``pool_size`` connections.

    A separate pool keeps groups in flight from taking the connections the scheduler loop needs.
    """
    from airflow import settings as airflow_settings
    from airflow.configuration import conf
    from airflow.utils.orm_event_handlers import setup_event_handlers

    engine_args = airflow_settings.prepare_engine_args()
    if "poolclass" not in engine_args:
        engine_args["pool_size"] = pool_size
        engine_args["max_overflow"] = 0
        # A group whose connection turns out dead is retried on a new one, so the round trip that
        # pre-ping adds to every group buys nothing.
        engine_args["pool_pre_ping"] = False
    connect_args = (
        conf.getimport("database", "sql_alchemy_connect_args")
        if conf.has_option("database", "sql_alchemy_connect_args")
        else {}
    )
    engine = airflow_settings.create_metadata_engine(
        airflow_settings.SQL_ALCHEMY_CONN, engine_args=engine_args, connect_args=connect_args
    )
    # Among others, this makes a connection checked out in another process (after a fork) reconnect.
    setup_event_handlers(engine)
    # A worker that LocalExecutor forks to replace a dead one must not share these connections, so the
    # child forgets them without closing them, as Airflow does for its own engine.
    engine_ref = weakref.ref(engine)

    def _forget_connections_in_child() -> None:
        forked_engine = engine_ref()
        if forked_engine is not None:
            forked_engine.dispose(close=False)

    os.register_at_fork(after_in_child=_forget_connections_in_child)
    return engine


def _session_factory(engine: Engine):
    from sqlalchemy.orm import sessionmaker

    return sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)
