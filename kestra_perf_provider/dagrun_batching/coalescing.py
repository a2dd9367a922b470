"""
Grouping of task-state updates by DAG run.

The :class:`Coalescer` collects updates from any transport, keeps one queue per DAG run
``(dag_id, run_id)`` and hands a group to an apply function when the group reaches
``max_batch_size`` or its oldest update has waited ``linger_ms``. Groups of different DAG runs are
applied concurrently, at most ``max_concurrent_groups`` at a time. A DAG run has at most one group in
flight, so the groups of one run never wait on each other's row locks. It knows nothing about the
database or the transport: both are passed in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field

from kestra_perf_provider.dagrun_batching.metrics import BatchingMetrics, NullMetrics
from kestra_perf_provider.dagrun_batching.updates import GroupKey, Outcome, OutcomeKind, StateUpdate

log = logging.getLogger(__name__)

ApplyGroup = Callable[[GroupKey, Sequence[StateUpdate], float], Mapping[tuple, Outcome]]
"""
``apply(group_key, updates, deadline) -> {update.identity: outcome}``.

``deadline`` is a :func:`time.monotonic` value: the earliest fallback deadline of the group's updates.
An update missing from the result, or an exception, makes every affected update fall back.
"""


@dataclass
class _Pending:
    update: StateUpdate
    future: Future[Outcome]
    enqueued_at: float
    deadline: float


@dataclass
class CoalescerStatistics:
    """Counters of a :class:`Coalescer`, for tests and logs."""

    groups_applied: int = 0
    updates_submitted: int = 0
    max_groups_in_flight: int = 0
    max_group_size: int = 0
    outcomes: dict[OutcomeKind, int] = field(default_factory=lambda: dict.fromkeys(OutcomeKind, 0))
    groups_committed: int = 0
    """Groups that applied at least one update."""
    flush_latency_ms_total: float = 0.0
    """Sum over committed groups of the time from their first update's arrival to their outcomes."""
    apply_ms_total: float = 0.0
    """Sum over all groups of the time spent in the apply function."""

    @property
    def mean_flush_latency_ms(self) -> float | None:
        """Mean time from a committed group's first arrival to its outcomes, in milliseconds."""
        return self.flush_latency_ms_total / self.groups_committed if self.groups_committed else None

    @property
    def mean_apply_ms(self) -> float | None:
        """Mean time a group spent in the apply function, retries included, in milliseconds."""
        return self.apply_ms_total / self.groups_applied if self.groups_applied else None


class Coalescer:
    """
    Group updates by DAG run and apply each group with ``apply_group`` on a bounded thread pool.

    :param apply_group: the function that applies one group; see :data:`ApplyGroup`.
    :param max_batch_size: largest group; a full group is applied without waiting for the linger.
    :param linger_seconds: longest wait of the oldest update of a group before the group is applied.
    :param max_concurrent_groups: largest number of groups applied at once.
    :param metrics: receiver of batch size, flush latency, conflicts and fallbacks.
    """

    def __init__(
        self,
        apply_group: ApplyGroup,
        *,
        max_batch_size: int,
        linger_seconds: float,
        max_concurrent_groups: int,
        max_groups_per_run: int = 1,
        metrics: BatchingMetrics | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if linger_seconds < 0:
            raise ValueError(f"linger_seconds must be >= 0, got {linger_seconds}")
        if max_concurrent_groups < 1:
            raise ValueError(f"max_concurrent_groups must be >= 1, got {max_concurrent_groups}")
        if max_groups_per_run < 1:
            raise ValueError(f"max_groups_per_run must be >= 1, got {max_groups_per_run}")
        self._apply_group = apply_group
        self._max_batch_size = max_batch_size
        self._linger = linger_seconds
        self._max_concurrent = max_concurrent_groups
        self._max_per_run = max_groups_per_run
        self._metrics = metrics or NullMetrics()

        self._cond = threading.Condition()
        self._pending: dict[GroupKey, deque[_Pending]] = {}
        self._in_flight: Counter[GroupKey] = Counter()
        self._in_flight_total = 0
        self._stopping = False
        self._closed = False
        self._stats = CoalescerStatistics()
        self._pool: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None

    def start(self) -> None:
        """Start the dispatcher thread and the pool of apply threads."""
        if self._dispatcher is not None:
            raise RuntimeError("Coalescer.start() was called twice; create a new Coalescer instead")
        self._pool = ThreadPoolExecutor(
            max_workers=self._max_concurrent, thread_name_prefix="dagrun-batching-apply"
        )
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="dagrun-batching-dispatch", daemon=True
        )
        self._dispatcher.start()

    def submit(self, update: StateUpdate, deadline: float) -> Future[Outcome]:
        """
        Queue one update and return the future of its outcome.

        :param update: the update to apply.
        :param deadline: :func:`time.monotonic` value after which the submitter falls back on its own;
            a group is not retried past the earliest deadline of its updates.
        """
        future: Future[Outcome] = Future()
        with self._cond:
            if self._stopping or self._dispatcher is None:
                future.set_result(Outcome.fell_back("the coalescer is not running"))
                return future
            queue = self._pending.setdefault(update.group_key, deque())
            queue.append(_Pending(update, future, time.monotonic(), deadline))
            self._stats.updates_submitted += 1
            self._cond.notify_all()
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """
        Apply what is queued, wait for groups in flight, and make every update left over fall back.

        :param timeout: seconds during which queued groups may still start; groups already in flight
            are always waited for, since their transactions may be committing.
        """
        with self._cond:
            if self._dispatcher is None or self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
        self._dispatcher.join(timeout)
        with self._cond:
            # Past the timeout no new group starts; the groups in flight still finish below.
            self._closed = True
            self._cond.notify_all()
        self._dispatcher.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)
        with self._cond:
            left_over = [pending for queue in self._pending.values() for pending in queue]
            self._pending.clear()
        for pending in left_over:
            self._resolve(pending, Outcome.fell_back("the executor is shutting down"))

    def statistics(self) -> CoalescerStatistics:
        """Return a copy of the counters."""
        with self._cond:
            return CoalescerStatistics(
                groups_applied=self._stats.groups_applied,
                updates_submitted=self._stats.updates_submitted,
                max_groups_in_flight=self._stats.max_groups_in_flight,
                max_group_size=self._stats.max_group_size,
                outcomes=dict(self._stats.outcomes),
                groups_committed=self._stats.groups_committed,
                flush_latency_ms_total=self._stats.flush_latency_ms_total,
                apply_ms_total=self._stats.apply_ms_total,
            )

    def _dispatch_loop(self) -> None:
        with self._cond:
            while True:
                if self._closed:
                    return
                wait = self._start_ready_groups()
                if self._stopping and not self._pending and not self._in_flight:
                    return
                self._cond.wait(wait)

    def _start_ready_groups(self) -> float | None:
        """Start every group that is due while the bounds allow; return seconds until the next is due."""
        while True:
            now = time.monotonic()
            due, next_due = self._due_groups(now)
            # Oldest first, so a busy DAG run cannot starve a quiet one when the bound is reached.
            started = False
            for _, key in sorted(due):
                if self._in_flight_total >= self._max_concurrent:
                    break
                self._start_group(key)
                started = True
            # A run whose queue still holds a due group may start it now that it has a free slot.
            if not started or self._in_flight_total >= self._max_concurrent:
                break
        if next_due is None:
            return None
        return max(0.0, next_due - now)

    def _due_groups(self, now: float) -> tuple[list[tuple[float, GroupKey]], float | None]:
        """Return the runs whose next group may start, oldest first, and when the next one is due."""
        due: list[tuple[float, GroupKey]] = []
        next_due: float | None = None
        for key, queue in self._pending.items():
            if self._in_flight[key] >= self._max_per_run or not queue:
                continue
            ready_at = queue[0].enqueued_at + self._linger
            if self._stopping or len(queue) >= self._max_batch_size or ready_at <= now:
                due.append((queue[0].enqueued_at, key))
            else:
                next_due = ready_at if next_due is None else min(next_due, ready_at)
        return due, next_due

    def _start_group(self, key: GroupKey) -> None:
        queue = self._pending[key]
        batch = [queue.popleft() for _ in range(min(self._max_batch_size, len(queue)))]
        if not queue:
            del self._pending[key]
        self._in_flight[key] += 1
        self._in_flight_total += 1
        self._stats.max_groups_in_flight = max(self._stats.max_groups_in_flight, self._in_flight_total)
        self._stats.max_group_size = max(self._stats.max_group_size, len(batch))
        assert self._pool is not None
        self._pool.submit(self._run_group, key, batch)

    def _run_group(self, key: GroupKey, batch: list[_Pending]) -> None:
        try:
            # A submitter that gave up cancelled its future; its update falls back on its own path.
            live = [pending for pending in batch if pending.future.set_running_or_notify_cancel()]
            if live:
                self._apply_and_resolve(key, live)
        finally:
            with self._cond:
                self._in_flight[key] -= 1
                if not self._in_flight[key]:
                    del self._in_flight[key]
                self._in_flight_total -= 1
                self._stats.groups_applied += 1
                self._cond.notify_all()

    def _apply_and_resolve(self, key: GroupKey, batch: list[_Pending]) -> None:
        updates: dict[tuple, StateUpdate] = {}
        for pending in batch:
            # Two copies of one update (a supervisor's replay) are applied once and share the outcome.
            updates.setdefault(pending.update.identity, pending.update)
        deadline = min(pending.deadline for pending in batch)
        started = time.monotonic()
        try:
            outcomes = self._apply_group(key, list(updates.values()), deadline)
        except Exception as err:
            log.exception("Applying a group failed; its updates fall back. dag_id=%s run_id=%s", *key)
            outcomes = {identity: Outcome.fell_back(f"apply failed: {err!r}") for identity in updates}
        with self._cond:
            self._stats.apply_ms_total += (time.monotonic() - started) * 1000.0

        applied = 0
        for pending in batch:
            outcome = outcomes.get(pending.update.identity) or Outcome.fell_back("no outcome for this update")
            if outcome.kind is OutcomeKind.APPLIED:
                applied += 1
            self._resolve(pending, outcome)
        if applied:
            latency_ms = (time.monotonic() - batch[0].enqueued_at) * 1000.0
            self._metrics.group_applied(size=applied, flush_latency_ms=latency_ms)
            with self._cond:
                self._stats.groups_committed += 1
                self._stats.flush_latency_ms_total += latency_ms

    def _resolve(self, pending: _Pending, outcome: Outcome) -> None:
        if outcome.kind is OutcomeKind.CONFLICT:
            self._metrics.updates_conflicted(1)
        elif outcome.kind is OutcomeKind.FELL_BACK:
            self._metrics.updates_fell_back(1)
        with self._cond:
            self._stats.outcomes[outcome.kind] += 1
        if pending.future.done():
            return
        try:
            pending.future.set_result(outcome)
        except InvalidStateError:  # The submitter cancelled in the meantime.
            log.debug("Outcome of ti_id=%s arrived after its submitter gave up", pending.update.ti_id)
