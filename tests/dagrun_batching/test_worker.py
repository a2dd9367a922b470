"""
Tests of the supervisor's batching client: which requests it sends, in which order, and what it folds.

An httpx transport records each request in place of the API server and responds with a success.
A sender records each update in place of the coalescer and returns a chosen outcome. The client
under test is the real one.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from airflow.sdk.api.client import ServerResponseError

from kestra_perf_provider.dagrun_batching.settings import BatchingSettings
from kestra_perf_provider.dagrun_batching.updates import Outcome, OutcomeKind, StateUpdate
from kestra_perf_provider.dagrun_batching.worker import BatchingClient

SETTINGS = BatchingSettings(
    enabled=True,
    max_batch_size=64,
    linger_ms=20,
    max_concurrent_groups=4,
    fallback_timeout=5.0,
    fold_task_writes=True,
    max_write_hold_ms=10_000,
    skip_start_heartbeat=True,
)


class RecordingServer:
    """Responds to every request with a success and records ``(method, path)`` in arrival order."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.fail_next: int | None = None
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append((request.method, request.url.path))
            status, self.fail_next = self.fail_next, None
        if status is not None:
            return httpx.Response(status, json={"detail": {"reason": "test", "message": "refused"}})
        if request.method == "GET":
            return httpx.Response(200, json={"key": "v", "value": "1"})
        return httpx.Response(201, json={"message": "ok"})

    def paths(self, method: str | None = None) -> list[str]:
        return [path for m, path in self.requests if method is None or m == method]


class RecordingSender:
    """Transport to the coalescer that records each update and returns ``outcome``."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.updates: list[StateUpdate] = []

    def send(self, update: StateUpdate, timeout: float) -> Outcome:
        self.updates.append(update)
        return self.outcome


@pytest.fixture
def ti():
    return SimpleNamespace(
        id=uuid.uuid4(), try_number=1, dag_id="fanout", run_id="run_1", task_id="work", map_index=3
    )


@pytest.fixture
def server():
    return RecordingServer()


def _client(ti, server, outcome=Outcome(kind=OutcomeKind.APPLIED), **overrides) -> BatchingClient:
    settings = dataclasses.replace(SETTINGS, **overrides)
    client = BatchingClient(
        ti=ti,
        sender=RecordingSender(outcome),
        settings=settings,
        base_url="http://127.0.0.1:9/execution/",
        token="token",
        transport=httpx.MockTransport(server),
    )
    return client


def _push_and_succeed(client: BatchingClient, ti) -> None:
    client.task_instances.set_rtif(ti.id, {"bash_command": "echo 1"})
    client.xcoms.set(ti.dag_id, ti.run_id, ti.task_id, "return_value", {"v": 1}, ti.map_index)
    client.task_instances.succeed(ti.id, _now(), [], [], None)


def _now():
    import datetime

    return datetime.datetime.now(datetime.UTC)


def _sender(client: BatchingClient) -> RecordingSender:
    return client.task_instances._sender


class TestHeldWrites:
    def test_applied_success_carries_writes_and_sends_nothing(self, ti, server):
        client = _client(ti, server)

        _push_and_succeed(client, ti)

        assert server.requests == []
        [update] = _sender(client).updates
        assert update.rendered_fields == {"bash_command": "echo 1"}
        assert update.xcoms == ({"key": "return_value", "value": {"v": 1}, "dag_result": False},)
        client.close()
        assert server.requests == []

    def test_fallback_sends_writes_then_state_in_task_order(self, ti, server):
        client = _client(ti, server, outcome=Outcome.fell_back("test"))

        _push_and_succeed(client, ti)

        assert server.requests == [
            ("PUT", f"/execution/task-instances/{ti.id}/rtif"),
            ("POST", "/execution/xcoms/fanout/run_1/work/return_value"),
            ("PATCH", f"/execution/task-instances/{ti.id}/state"),
        ]

    def test_conflict_sends_writes_then_raises_server_error(self, ti, server):
        conflict = Outcome(kind=OutcomeKind.CONFLICT, reason="invalid_state", previous_state="failed")
        client = _client(ti, server, outcome=conflict)

        with pytest.raises(ServerResponseError) as raised:
            _push_and_succeed(client, ti)

        assert raised.value.response.status_code == 409
        assert server.paths() == [
            f"/execution/task-instances/{ti.id}/rtif",
            "/execution/xcoms/fanout/run_1/work/return_value",
        ]

    def test_other_request_sends_held_writes_first(self, ti, server):
        client = _client(ti, server)

        client.task_instances.set_rtif(ti.id, {"bash_command": "echo 1"})
        assert server.requests == []
        client.variables.get("v")

        assert server.requests == [
            ("PUT", f"/execution/task-instances/{ti.id}/rtif"),
            ("GET", "/execution/variables/v"),
        ]
        client.task_instances.succeed(ti.id, _now(), [], [], None)
        assert _sender(client).updates[0].rendered_fields is None

    def test_failure_sends_rendered_fields_before_state(self, ti, server):
        client = _client(ti, server)

        client.task_instances.set_rtif(ti.id, {"bash_command": "exit 1"})
        client.task_instances.finish(ti.id, "failed", _now(), None)

        assert server.requests == [
            ("PUT", f"/execution/task-instances/{ti.id}/rtif"),
            ("PATCH", f"/execution/task-instances/{ti.id}/state"),
        ]
        assert _sender(client).updates == []

    def test_write_held_too_long_is_sent_alone(self, ti, server):
        client = _client(ti, server, max_write_hold_ms=100)

        client.task_instances.set_rtif(ti.id, {"bash_command": "sleep 60"})
        deadline = time.monotonic() + 5
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.02)

        assert server.requests == [("PUT", f"/execution/task-instances/{ti.id}/rtif")]
        client.task_instances.succeed(ti.id, _now(), [], [], None)
        assert server.requests == [("PUT", f"/execution/task-instances/{ti.id}/rtif")]
        assert _sender(client).updates[0].rendered_fields is None

    @pytest.mark.parametrize(
        ("key", "task_id", "map_index", "mapped_length"),
        [
            ("custom", "work", 3, None),  # pushed during execute(): other readers may look for it
            ("return_value", "other", 3, None),
            ("return_value", "work", 4, None),
            ("return_value", "work", 3, 10),  # the server checks it against max_map_length
        ],
    )
    def test_only_own_return_value_is_held(self, ti, server, key, task_id, map_index, mapped_length):
        client = _client(ti, server)

        client.xcoms.set(ti.dag_id, ti.run_id, task_id, key, 1, map_index, mapped_length=mapped_length)

        assert server.paths("POST") == [f"/execution/xcoms/fanout/run_1/{task_id}/{key}"]

    def test_folding_off_sends_at_once(self, ti, server):
        client = _client(ti, server, fold_task_writes=False)

        _push_and_succeed(client, ti)

        assert server.paths() == [
            f"/execution/task-instances/{ti.id}/rtif",
            "/execution/xcoms/fanout/run_1/work/return_value",
        ]
        [update] = _sender(client).updates
        assert (update.rendered_fields, update.xcoms) == (None, ())

    def test_failed_send_is_held_again_and_retried(self, ti, server):
        client = _client(ti, server)
        client.task_instances.set_rtif(ti.id, {"bash_command": "echo 1"})
        server.fail_next = 400

        with pytest.raises(ServerResponseError):
            client.variables.get("v")
        client.variables.get("v")

        rtif = f"/execution/task-instances/{ti.id}/rtif"
        assert server.paths() == [rtif, rtif, "/execution/variables/v"]

    def test_failed_send_does_not_block_state_update(self, ti, server):
        client = _client(ti, server)
        client.task_instances.set_rtif(ti.id, {"bash_command": "exit 1"})
        server.fail_next = 400

        client.task_instances.finish(ti.id, "failed", _now(), None)

        assert server.requests == [
            ("PUT", f"/execution/task-instances/{ti.id}/rtif"),
            ("PATCH", f"/execution/task-instances/{ti.id}/state"),
        ]
        client.close()  # The write is still held: the last chance to send it.
        assert server.paths()[-1] == f"/execution/task-instances/{ti.id}/rtif"

    def test_nan_value_fails_at_once(self, ti, server):
        client = _client(ti, server)

        # httpx refuses NaN in a JSON body, so the stock push fails in the task before its success.
        with pytest.raises(ValueError, match="JSON"):
            client.xcoms.set(ti.dag_id, ti.run_id, ti.task_id, "return_value", float("nan"), ti.map_index)
        client.task_instances.succeed(ti.id, _now(), [], [], None)

        assert _sender(client).updates[0].xcoms == ()

    def test_close_sends_what_is_held(self, ti, server):
        client = _client(ti, server)
        client.task_instances.set_rtif(ti.id, {"bash_command": "echo 1"})

        client.close()

        assert server.paths() == [f"/execution/task-instances/{ti.id}/rtif"]


class SequenceServer(RecordingServer):
    """Serves the item and slice routes over ``values``, as the XCom routes do, 404 past the end."""

    def __init__(self, values: list) -> None:
        super().__init__()
        self.values = values

    def __call__(self, request: httpx.Request) -> httpx.Response:
        super().__call__(request)
        path = request.url.path
        if "/item/" in path:
            offset = int(path.rsplit("/", 1)[1])
            if offset >= len(self.values):
                return httpx.Response(404, json={"detail": {"reason": "not_found", "message": "no XCom"}})
            return httpx.Response(200, json=self.values[offset])
        if path.endswith("/slice"):
            start = int(request.url.params.get("start", 0))
            stop = int(request.url.params.get("stop", len(self.values)))
            return httpx.Response(200, json=self.values[start:stop])
        return httpx.Response(201, json={"message": "ok"})


class TestReadAhead:
    def _iterate(self, client: BatchingClient) -> list:
        """Read items until "not found", as a task iterating over a mapped task's results does."""
        from airflow.sdk.execution_time.comms import ErrorResponse

        values = []
        while True:
            item = client.xcoms.get_sequence_item("fanout", "run_1", "work", "return_value", len(values))
            if isinstance(item, ErrorResponse):
                return values
            values.append(item.root)

    def test_window_serves_items(self, ti):
        server = SequenceServer([{"item": i} for i in range(10)])
        client = _client(ti, server, xcom_read_ahead=4)

        values = self._iterate(client)

        assert values == [{"item": i} for i in range(10)]
        slices = [path for path in server.paths() if path.endswith("/slice")]
        items = [path for path in server.paths() if "/item/" in path]
        assert len(slices) == 3  # Slices [0, 4), [4, 8) and [8, 12), the last with 2 items.
        # Only the request past the end goes to the item route, which returns "not found".
        assert items == ["/execution/xcoms/fanout/run_1/work/return_value/item/10"]

    def test_alternating_sequences_keep_windows(self, ti):
        server = SequenceServer(list(range(6)))
        client = _client(ti, server, xcom_read_ahead=8)

        # zip() over two mapped tasks reads one item of each in turn.
        for offset in range(6):
            for task_id in ("work", "other"):
                item = client.xcoms.get_sequence_item("fanout", "run_1", task_id, "return_value", offset)
                assert item.root == offset

        slices = [path for path in server.paths() if path.endswith("/slice")]
        assert len(slices) == 2

    def test_read_ahead_off_sends_each_item(self, ti):
        server = SequenceServer(list(range(5)))
        client = _client(ti, server, xcom_read_ahead=0)

        assert self._iterate(client) == list(range(5))
        assert len(server.paths()) == 6
        assert not any(path.endswith("/slice") for path in server.paths())

    def test_empty_sequence_not_found(self, ti):
        server = SequenceServer([])
        client = _client(ti, server, xcom_read_ahead=8)

        assert self._iterate(client) == []
        assert server.paths()[-1] == "/execution/xcoms/fanout/run_1/work/return_value/item/0"
