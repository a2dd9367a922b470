"""
Tests of the :class:`Coalescer` and of the Unix socket transport that feeds it.

The apply functions here are plain recorders: the coalescer's contract is grouping, flushing, the
concurrency bound and outcome delivery, whatever applies the groups.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from kestra_perf_provider.dagrun_batching.coalescing import Coalescer
from kestra_perf_provider.dagrun_batching.exceptions import TransportError
from kestra_perf_provider.dagrun_batching.transport import UnixSocketReceiver, UnixSocketSender
from kestra_perf_provider.dagrun_batching.updates import Outcome, OutcomeKind, StateUpdate

RESULT_TIMEOUT = 30.0


def _update(run_id: str, *, ti_id: uuid.UUID | None = None, try_number: int = 1) -> StateUpdate:
    return StateUpdate(
        ti_id=ti_id or uuid.uuid4(),
        try_number=try_number,
        dag_id="dag",
        run_id=run_id,
        payload={"state": "success", "end_date": "2024-01-01T00:00:00+00:00"},
    )


class RecordingApplier:
    """Apply function that records each group and marks every update applied."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.groups: list[tuple[tuple[str, str], list[StateUpdate]]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_keys: set[tuple[str, str]] = set()
        self.same_run_overlap = False
        self.hold = hold

    def __call__(self, key, updates, deadline):
        with self.lock:
            self.groups.append((key, list(updates)))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if key in self.in_flight_keys:
                self.same_run_overlap = True
            self.in_flight_keys.add(key)
        try:
            if self.hold is not None:
                self.hold.wait(RESULT_TIMEOUT)
            return {update.identity: Outcome(kind=OutcomeKind.APPLIED) for update in updates}
        finally:
            with self.lock:
                self.in_flight -= 1
                self.in_flight_keys.discard(key)


@pytest.fixture
def make_coalescer():
    created: list[Coalescer] = []

    def _make(apply_group, **kwargs) -> Coalescer:
        options = {"max_batch_size": 10, "linger_seconds": 0.05, "max_concurrent_groups": 4} | kwargs
        coalescer = Coalescer(apply_group, **options)
        coalescer.start()
        created.append(coalescer)
        return coalescer

    yield _make
    for coalescer in created:
        coalescer.stop(timeout=5)


def _deadline() -> float:
    return time.monotonic() + 60


class TestCoalescer:
    def test_groups_by_dag_run(self, make_coalescer):
        applier = RecordingApplier()
        coalescer = make_coalescer(applier, linger_seconds=0.3)
        updates = [_update(run) for _ in range(4) for run in ("run_a", "run_b", "run_c")]

        futures = [coalescer.submit(update, _deadline()) for update in updates]
        outcomes = [future.result(RESULT_TIMEOUT) for future in futures]

        assert {outcome.kind for outcome in outcomes} == {OutcomeKind.APPLIED}
        for key, group in applier.groups:
            assert {update.group_key for update in group} == {key}
        applied = sorted(update.ti_id for _, group in applier.groups for update in group)
        assert applied == sorted(update.ti_id for update in updates)
        assert sorted(key[1] for key, _ in applier.groups) == ["run_a", "run_b", "run_c"]

    def test_full_group_flushes_before_linger(self, make_coalescer):
        applier = RecordingApplier()
        # A linger far longer than the test: only the size can trigger the flush.
        coalescer = make_coalescer(applier, max_batch_size=3, linger_seconds=3600)

        futures = [coalescer.submit(_update("run_a"), _deadline()) for _ in range(3)]
        late = coalescer.submit(_update("run_a"), _deadline())

        assert [future.result(RESULT_TIMEOUT).kind for future in futures] == [OutcomeKind.APPLIED] * 3
        assert [len(group) for _, group in applier.groups] == [3]
        assert not late.done()
        coalescer.stop(timeout=5)
        assert late.result(RESULT_TIMEOUT).kind is OutcomeKind.APPLIED
        assert [len(group) for _, group in applier.groups] == [3, 1]

    def test_linger_collects_then_flushes(self, make_coalescer):
        applier = RecordingApplier()
        coalescer = make_coalescer(applier, max_batch_size=100, linger_seconds=0.5)

        first = coalescer.submit(_update("run_a"), _deadline())
        second = coalescer.submit(_update("run_a"), _deadline())

        assert first.result(RESULT_TIMEOUT).kind is OutcomeKind.APPLIED
        assert second.result(RESULT_TIMEOUT).kind is OutcomeKind.APPLIED
        assert [len(group) for _, group in applier.groups] == [2]
        statistics = coalescer.statistics()
        assert statistics.groups_committed == 1
        assert statistics.mean_flush_latency_ms is not None

    def test_concurrent_groups_bounded(self, make_coalescer):
        hold = threading.Event()
        applier = RecordingApplier(hold=hold)
        coalescer = make_coalescer(applier, max_concurrent_groups=2, linger_seconds=0)

        futures = [coalescer.submit(_update(f"run_{index}"), _deadline()) for index in range(6)]
        deadline = time.monotonic() + RESULT_TIMEOUT
        while applier.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a third group to start if the bound were broken
        in_flight_while_held = applier.in_flight
        hold.set()
        outcomes = [future.result(RESULT_TIMEOUT) for future in futures]

        assert in_flight_while_held == 2
        assert applier.max_in_flight == 2
        assert coalescer.statistics().max_groups_in_flight == 2
        assert {outcome.kind for outcome in outcomes} == {OutcomeKind.APPLIED}
        assert len(applier.groups) == 6

    def test_one_group_per_run_in_flight(self, make_coalescer):
        hold = threading.Event()
        applier = RecordingApplier(hold=hold)
        coalescer = make_coalescer(applier, max_batch_size=1, max_concurrent_groups=4, linger_seconds=0)

        futures = [coalescer.submit(_update("run_a"), _deadline()) for _ in range(4)]
        time.sleep(0.2)
        in_flight_while_held = applier.in_flight
        hold.set()
        for future in futures:
            future.result(RESULT_TIMEOUT)

        assert in_flight_while_held == 1
        assert not applier.same_run_overlap
        assert applier.max_in_flight == 1
        assert len(applier.groups) == 4

    def test_groups_per_run_bounded(self, make_coalescer):
        hold = threading.Event()
        applier = RecordingApplier(hold=hold)
        coalescer = make_coalescer(
            applier, max_batch_size=1, max_concurrent_groups=4, max_groups_per_run=2, linger_seconds=0
        )

        futures = [coalescer.submit(_update("run_a"), _deadline()) for _ in range(4)]
        deadline = time.monotonic() + RESULT_TIMEOUT
        while applier.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a third group of the run to start if the bound were broken
        in_flight_while_held = applier.in_flight
        hold.set()
        for future in futures:
            future.result(RESULT_TIMEOUT)

        assert in_flight_while_held == 2
        assert applier.max_in_flight == 2
        assert coalescer.statistics().max_groups_in_flight == 2

    def test_outcomes_delivered_per_update(self, make_coalescer):
        applied, conflicted, missing = _update("run_a"), _update("run_a"), _update("run_a")

        def apply_group(key, updates, deadline):
            return {
                applied.identity: Outcome(kind=OutcomeKind.APPLIED),
                conflicted.identity: Outcome(
                    kind=OutcomeKind.CONFLICT, reason="invalid_state", previous_state="failed"
                ),
            }

        coalescer = make_coalescer(apply_group)
        futures = {
            name: coalescer.submit(u, _deadline())
            for name, u in (("applied", applied), ("conflicted", conflicted), ("missing", missing))
        }

        assert futures["applied"].result(RESULT_TIMEOUT).kind is OutcomeKind.APPLIED
        conflict = futures["conflicted"].result(RESULT_TIMEOUT)
        assert conflict.kind is OutcomeKind.CONFLICT
        assert conflict.previous_state == "failed"
        assert futures["missing"].result(RESULT_TIMEOUT).kind is OutcomeKind.FELL_BACK
        outcomes = coalescer.statistics().outcomes
        assert outcomes[OutcomeKind.APPLIED] == 1
        assert outcomes[OutcomeKind.CONFLICT] == 1
        assert outcomes[OutcomeKind.FELL_BACK] == 1

    def test_apply_error_falls_back(self, make_coalescer):
        def apply_group(key, updates, deadline):
            raise RuntimeError("database unreachable")

        coalescer = make_coalescer(apply_group)

        outcome = coalescer.submit(_update("run_a"), _deadline()).result(RESULT_TIMEOUT)

        assert outcome.kind is OutcomeKind.FELL_BACK
        assert "database unreachable" in outcome.reason

    def test_duplicate_update_applied_once(self, make_coalescer):
        applier = RecordingApplier()
        coalescer = make_coalescer(applier, linger_seconds=0.3)
        ti_id = uuid.uuid4()

        first = coalescer.submit(_update("run_a", ti_id=ti_id), _deadline())
        replay = coalescer.submit(_update("run_a", ti_id=ti_id), _deadline())

        assert first.result(RESULT_TIMEOUT).kind is OutcomeKind.APPLIED
        assert replay.result(RESULT_TIMEOUT).kind is OutcomeKind.APPLIED
        assert [len(group) for _, group in applier.groups] == [1]

    def test_cancelled_update_not_applied(self, make_coalescer):
        applier = RecordingApplier()
        coalescer = make_coalescer(applier, linger_seconds=0.5)
        kept, withdrawn = _update("run_a"), _update("run_a")

        kept_future = coalescer.submit(kept, _deadline())
        assert coalescer.submit(withdrawn, _deadline()).cancel()

        assert kept_future.result(RESULT_TIMEOUT).kind is OutcomeKind.APPLIED
        assert [[u.ti_id for u in group] for _, group in applier.groups] == [[kept.ti_id]]

    def test_stop_timeout_falls_back_queued(self, make_coalescer):
        hold = threading.Event()
        applier = RecordingApplier(hold=hold)
        coalescer = make_coalescer(applier, max_concurrent_groups=1, linger_seconds=0)
        running = coalescer.submit(_update("run_a"), _deadline())
        deadline = time.monotonic() + RESULT_TIMEOUT
        while applier.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = coalescer.submit(_update("run_b"), _deadline())

        stopper = threading.Thread(target=coalescer.stop, kwargs={"timeout": 0.2})
        stopper.start()
        time.sleep(0.5)
        hold.set()
        stopper.join(RESULT_TIMEOUT)

        assert running.result(RESULT_TIMEOUT).kind is OutcomeKind.APPLIED
        assert queued.result(RESULT_TIMEOUT).kind is OutcomeKind.FELL_BACK
        assert [key[1] for key, _ in applier.groups] == ["run_a"]

    def test_submit_after_stop_falls_back(self, make_coalescer):
        coalescer = make_coalescer(RecordingApplier())
        coalescer.stop(timeout=5)

        outcome = coalescer.submit(_update("run_a"), _deadline()).result(RESULT_TIMEOUT)

        assert outcome.kind is OutcomeKind.FELL_BACK

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            pytest.param("max_batch_size", 0, id="batch-size"),
            pytest.param("linger_seconds", -1, id="linger"),
            pytest.param("max_concurrent_groups", 0, id="concurrency"),
            pytest.param("max_groups_per_run", 0, id="per-run"),
        ],
    )
    def test_invalid_option_rejected(self, option, value):
        options = {"max_batch_size": 1, "linger_seconds": 0, "max_concurrent_groups": 1, option: value}
        with pytest.raises(ValueError, match=option):
            Coalescer(RecordingApplier(), **options)


@pytest.fixture
def socket_path(tmp_path):
    # Unix socket paths are limited to about 100 bytes, so keep it short.
    return str(tmp_path / "u.sock")


class TestUnixSocketTransport:
    def test_outcome_round_trip(self, make_coalescer, socket_path):
        applier = RecordingApplier()
        coalescer = make_coalescer(applier, linger_seconds=0.2)
        receiver = UnixSocketReceiver(socket_path, coalescer.submit)
        receiver.start()
        try:
            sender = receiver.sender()
            updates = [_update(run) for run in ("run_a", "run_a", "run_b")]
            results: list[Outcome] = []
            threads = [
                threading.Thread(target=lambda u=u: results.append(sender.send(u, timeout=20)))
                for u in updates
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(RESULT_TIMEOUT)
        finally:
            receiver.stop()

        assert [outcome.kind for outcome in results] == [OutcomeKind.APPLIED] * 3
        received = sorted((u.ti_id, u.payload["end_date"]) for _, group in applier.groups for u in group)
        assert received == sorted((u.ti_id, u.payload["end_date"]) for u in updates)
        assert sorted(len(group) for _, group in applier.groups) == [1, 2]

    def test_timeout_reports_fallback(self, make_coalescer, socket_path):
        hold = threading.Event()
        coalescer = make_coalescer(RecordingApplier(hold=hold), linger_seconds=0)
        receiver = UnixSocketReceiver(socket_path, coalescer.submit)
        receiver.start()
        try:
            outcome = receiver.sender().send(_update("run_a"), timeout=0.3)
        finally:
            hold.set()
            receiver.stop()

        assert outcome.kind is OutcomeKind.FELL_BACK

    def test_missing_receiver_raises(self, socket_path):
        sender = UnixSocketSender(socket_path)

        with pytest.raises(TransportError, match="u.sock"):
            sender.send(_update("run_a"), timeout=1)

    def test_stopped_receiver_raises(self, make_coalescer, socket_path):
        receiver = UnixSocketReceiver(socket_path, make_coalescer(RecordingApplier()).submit)
        receiver.start()
        receiver.stop()

        with pytest.raises(TransportError):
            UnixSocketSender(socket_path).send(_update("run_a"), timeout=1)
