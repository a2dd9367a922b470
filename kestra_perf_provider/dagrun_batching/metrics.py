"""Metrics of DAG-run batching, sent through Airflow's ``Stats`` under the ``dagrun_batching.`` prefix."""

from __future__ import annotations

from typing import Protocol


class BatchingMetrics(Protocol):
    """Receiver of batching events; :class:`StatsMetrics` sends them to Airflow's metrics backend."""

    def group_applied(self, *, size: int, flush_latency_ms: float) -> None:
        """Record a group that was committed with ``size`` updates, ``flush_latency_ms`` after its first arrived."""

    def group_retried(self) -> None:
        """Record one retry of a group after a transient database error."""

    def updates_fell_back(self, count: int) -> None:
        """Record updates handed back to the stock API path."""

    def updates_conflicted(self, count: int) -> None:
        """Record updates whose row was no longer running the same try."""


class StatsMetrics:
    """
    Send batching metrics to Airflow's ``Stats`` (StatsD or OpenTelemetry, as configured).

    Names: ``dagrun_batching.batch_size`` (gauge, updates per committed group),
    ``dagrun_batching.flush_latency`` (timer, first arrival to commit), ``dagrun_batching.groups``,
    ``dagrun_batching.retries``, ``dagrun_batching.fallbacks`` and ``dagrun_batching.conflicts`` (counters).
    """

    def __init__(self) -> None:
        from airflow.observability.stats import Stats

        self._stats = Stats

    def group_applied(self, *, size: int, flush_latency_ms: float) -> None:
        self._stats.incr("dagrun_batching.groups")
        self._stats.gauge("dagrun_batching.batch_size", size)
        self._stats.timing("dagrun_batching.flush_latency", flush_latency_ms)

    def group_retried(self) -> None:
        self._stats.incr("dagrun_batching.retries")

    def updates_fell_back(self, count: int) -> None:
        if count:
            self._stats.incr("dagrun_batching.fallbacks", count)

    def updates_conflicted(self, count: int) -> None:
        if count:
            self._stats.incr("dagrun_batching.conflicts", count)


class NullMetrics:
    """Discard batching metrics."""

    def group_applied(self, *, size: int, flush_latency_ms: float) -> None:
        pass

    def group_retried(self) -> None:
        pass

    def updates_fell_back(self, count: int) -> None:
        pass

    def updates_conflicted(self, count: int) -> None:
        pass
