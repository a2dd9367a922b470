"""
Worker side of DAG-run batching: LocalExecutor worker processes whose supervisors batch success updates.

Airflow's ``supervise_task()`` accepts a preconfigured API client. The worker passes a
:class:`BatchingClient`, a subclass of the task SDK's ``Client`` whose ``task_instances.succeed()`` hands
the update to the coalescer through a transport instead of sending ``PATCH /task-instances/{id}/state``.

With ``fold_task_writes``, the client also holds back two writes of its own task instance, the
rendered template fields (``PUT /rtif``) and the return-value XCom (``POST /xcoms``), and sends them
with the success update, so they commit in the group's transaction. A held write is sent as stock
Airflow sends it, in its original order, before any other request the client makes, when it has been
held for ``max_write_hold_ms``, and when the success is not applied in a group.

Every other call, including ``finish()`` (failed), ``retry()`` (up_for_retry), deferral, reschedule,
later heartbeats and other XComs, goes to the API server unchanged. No Airflow class is patched.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx
from airflow.sdk.api.client import Client, ServerResponseError, TaskInstanceOperations, XComOperations

from kestra_perf_provider.dagrun_batching.exceptions import TransportError
from kestra_perf_provider.dagrun_batching.updates import OutcomeKind, StateUpdate

if TYPE_CHECKING:
    import uuid
    from datetime import datetime

    from kestra_perf_provider.dagrun_batching.settings import BatchingSettings
    from kestra_perf_provider.dagrun_batching.transport import UpdateSender

log = logging.getLogger(__name__)

_RETURN_VALUE_KEY = "return_value"

# Sequences read ahead at once, such as zip() over several mapped tasks; each keeps one window.
_MAX_READ_AHEAD_WINDOWS = 8


def _is_strict_json(value: Any) -> bool:
    """
    Tell whether ``value`` encodes as strict JSON, as httpx encodes a request body.

    The stock request fails in the task for NaN, infinities or a value JSON cannot encode, so the
    task fails at once as before. Held, the value would fail only when its group is written.
    """
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class HeldWrites:
    """
    Writes of one task instance held back so that they commit with its success.

    One lock orders everything: the client takes it before each request to send what is held first,
    the timer takes it to send writes held for too long, and ``succeed()`` takes it to move the held
    writes into its update. Writes are held only by the supervisor's own thread, between its
    requests, so a write is sent at most once and never after a request the task made later.

    :param client: the client whose stock operations send the writes.
    :param ti: the task instance the supervisor runs.
    :param max_hold: seconds a write may be held before it is sent on its own.
    """

    def __init__(self, client: Client, ti: Any, max_hold: float) -> None:
        self._client = client
        self._ti = ti
        self._max_hold = max_hold
        self._lock = threading.RLock()
        self._sending = False
        self._rendered_fields: dict[str, Any] | None = None
        self._xcoms: list[dict[str, Any]] = []
        self._timer: threading.Timer | None = None

    def hold_rendered_fields(self, body: dict[str, Any]) -> bool:
        """
        Hold the body of ``PUT /rtif``; a later body replaces it, as the server's upsert would.

        :return: False, holding nothing, when the body is not strict JSON; the caller sends it at once.
        """
        if not _is_strict_json(body):
            return False
        with self._lock:
            self._rendered_fields = body
            self._start_timer()
        return True

    def hold_xcom(self, key: str, value: Any, dag_result: bool) -> bool:
        """
        Hold one ``POST /xcoms`` of the task instance.

        :return: False, holding nothing, when the value is not strict JSON; the caller sends it at once.
        """
        if not _is_strict_json(value):
            return False
        with self._lock:
            self._xcoms.append({"key": key, "value": value, "dag_result": bool(dag_result)})
            self._start_timer()
        return True

    def take(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Remove and return what is held; the caller folds it into its update or passes it to :meth:`send`."""
        with self._lock:
            taken = (self._rendered_fields, self._xcoms)
            self._rendered_fields, self._xcoms = None, []
            self._cancel_timer()
            return taken

    def send(self, rendered_fields: dict[str, Any] | None, xcoms: list[dict[str, Any]]) -> None:
        """
        Send writes through the stock API calls, rendered fields first, as the task made them.

        :raises Exception: what the stock call raised; the writes not sent yet are held again.
        """
        with self._lock:
            self._sending = True
            try:
                if rendered_fields is not None:
                    self._send_rendered_fields(rendered_fields)
                    rendered_fields = None
                while xcoms:
                    item = xcoms[0]
                    XComOperations(self._client).set(
                        self._ti.dag_id,
                        self._ti.run_id,
                        self._ti.task_id,
                        item["key"],
                        item["value"],
                        self._ti.map_index,
                        dag_result=item["dag_result"],
                    )
                    xcoms = xcoms[1:]
            except BaseException:
                # Held again, ahead of anything held since, so the next flush retries them in order.
                if self._rendered_fields is None:
                    self._rendered_fields = rendered_fields
                self._xcoms = list(xcoms) + self._xcoms
                self._start_timer()
                raise
            finally:
                self._sending = False

    def flush(self) -> None:
        """Send whatever is held. Requests made while sending (this thread's own) skip the flush."""
        with self._lock:
            if self._sending or (self._rendered_fields is None and not self._xcoms):
                return
            self.send(*self.take())

    def close(self) -> None:
        """Stop the timer."""
        with self._lock:
            self._cancel_timer()

    def _send_rendered_fields(self, body: dict[str, Any]) -> None:
        try:
            TaskInstanceOperations(self._client).set_rtif(self._ti.id, body)
        except ServerResponseError as err:
            # The supervisor skips the same 410: a retry or a clear archived the task instance.
            if err.response.status_code != HTTPStatus.GONE:
                raise
            log.debug("Held rendered fields dropped: the task instance was archived. ti_id=%s", self._ti.id)

    def _start_timer(self) -> None:
        if self._timer is not None:
            return
        self._timer = threading.Timer(self._max_hold, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            try:
                self.flush()
            except Exception:
                log.warning(
                    "Held writes of ti_id=%s could not be sent yet; they are sent again before the "
                    "next request.",
                    self._ti.id,
                    exc_info=True,
                )


class BatchingTaskInstanceOperations(TaskInstanceOperations):
    """
    ``client.task_instances`` of a :class:`BatchingClient`: ``succeed()`` goes through the coalescer.

    :param client: the owning client, used for every other call and for the fallback.
    :param ti: the task instance the supervisor runs (``id``, ``try_number``, ``dag_id``, ``run_id``).
    :param sender: the transport's sending side.
    :param settings: the ``[dagrun_batching]`` settings.
    :param held: the client's held writes, or None when writes are not folded.
    """

    __slots__ = ("_held", "_min_heartbeat_interval", "_sender", "_settings", "_started_at", "_ti")

    def __init__(
        self,
        client: Client,
        *,
        ti: Any,
        sender: UpdateSender,
        settings: BatchingSettings,
        held: HeldWrites | None,
    ) -> None:
        super().__init__(client)
        self._ti = ti
        self._sender = sender
        self._settings = settings
        self._held = held
        self._started_at: float | None = None
        self._min_heartbeat_interval = _min_heartbeat_interval()

    def start(self, id: uuid.UUID, pid: int, when: datetime):
        """Send ``PATCH /run`` as stock Airflow does, and note when it recorded the first heartbeat."""
        context = super().start(id, pid, when)
        if id == self._ti.id:
            self._started_at = time.monotonic()
        return context

    def heartbeat(self, id: uuid.UUID, pid: int):
        """
        Send the heartbeat, except the first one when ``PATCH /run`` recorded it moments ago.

        The supervisor sends its first heartbeat as soon as the task starts, then one every
        ``[workers] min_heartbeat_interval``. ``PATCH /run`` has just set ``last_heartbeat_at`` and
        checked the host and pid, so the first heartbeat inside that interval would record the same.
        """
        # Only the first heartbeat after start may be skipped; later ones keep stock timing.
        started_at, self._started_at = self._started_at, None
        if (
            self._settings.skip_start_heartbeat
            and id == self._ti.id
            and started_at is not None
            and time.monotonic() - started_at < self._min_heartbeat_interval
        ):
            return None
        return super().heartbeat(id, pid)

    def set_rtif(self, id: uuid.UUID, body: dict[str, str]):
        """Hold this task's rendered fields to write them with its success; send any other task's."""
        if self._held is None or id != self._ti.id:
            return super().set_rtif(id, body)
        from airflow.sdk.execution_time.comms import OKResponse

        if not self._held.hold_rendered_fields(body):
            return super().set_rtif(id, body)
        return OKResponse(ok=True)

    def succeed(self, id: uuid.UUID, when: datetime, task_outlets, outlet_events, rendered_map_index):
        """Have the executor apply this success with the rest of its DAG run, or send it as stock does."""
        if id != self._ti.id:
            return super().succeed(id, when, task_outlets, outlet_events, rendered_map_index)

        from airflow.sdk.api.datamodels._generated import TISuccessStatePayload

        # The same body the stock client sends, so the applier validates it with the API server's model.
        body = TISuccessStatePayload(
            end_date=when,
            task_outlets=task_outlets,
            outlet_events=outlet_events,
            rendered_map_index=rendered_map_index,
        )
        rendered_fields, xcoms = self._held.take() if self._held is not None else (None, [])
        update = StateUpdate(
            ti_id=id,
            try_number=int(self._ti.try_number),
            dag_id=self._ti.dag_id,
            run_id=self._ti.run_id,
            payload=json.loads(body.model_dump_json()),
            rendered_fields=rendered_fields,
            xcoms=tuple(xcoms),
        )
        try:
            outcome = self._sender.send(update, timeout=self._settings.fallback_timeout)
        except TransportError as err:
            log.warning("Batched success update not delivered; sending it to the API server. %s", err)
            outcome = None

        if outcome is not None and outcome.kind is OutcomeKind.APPLIED:
            return None
        # Not applied: the held writes go out as stock Airflow sends them, before the state update,
        # so the database ends as it would have without batching.
        if self._held is not None:
            self._held.send(rendered_fields, xcoms)
        if outcome is not None and outcome.kind is OutcomeKind.CONFLICT:
            raise _conflict_error(self.client, id, outcome.reason, outcome.previous_state)
        if outcome is not None:
            log.warning(
                "Batched success update fell back to the API server. ti_id=%s reason=%s", id, outcome.reason
            )
        return super().succeed(id, when, task_outlets, outlet_events, rendered_map_index)


class BatchingXComOperations(XComOperations):
    """
    ``client.xcoms`` of a :class:`BatchingClient`: keeps back the task's return value, reads ahead.

    Only the return value of the supervisor's own task instance is held: the task pushes it after
    ``execute()`` returns and reports success next, so nothing reads it in between. A value that
    feeds a mapped downstream task (``mapped_length`` set) is sent at once, because the API server
    checks its length against ``[core] max_map_length`` and the task must see that error.

    A task that iterates over a mapped task's results (a fan-in) asks for them one item at a time.
    With ``xcom_read_ahead``, the first item request of a window fetches the next
    ``xcom_read_ahead`` items in one slice request, and the following item requests are served from
    that window. Past the end of the results, the item request goes to the server, which returns
    "not found" as before.

    :param held: the client's held writes, or None when writes are not folded.
    :param read_ahead: items fetched per slice request; 0 sends every item request.
    """

    __slots__ = ("_held", "_read_ahead", "_ti", "_windows")

    def __init__(self, client: Client, *, ti: Any, held: HeldWrites | None, read_ahead: int) -> None:
        super().__init__(client)
        self._ti = ti
        self._held = held
        self._read_ahead = read_ahead
        # By (dag_id, run_id, task_id, key): the window's first offset and the values from there on.
        # A fetched window is inserted last, so the one fetched longest ago is dropped first.
        self._windows: dict[tuple[str, str, str, str], tuple[int, list[Any]]] = {}

    def set(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        key: str,
        value,
        map_index: int | None = None,
        *,
        dag_result: bool = False,
        mapped_length: int | None = None,
    ):
        """Hold this task's return value to write it with its success; send any other XCom."""
        own = (
            self._held is not None
            and key == _RETURN_VALUE_KEY
            and mapped_length is None
            and (dag_id, run_id, task_id) == (self._ti.dag_id, self._ti.run_id, self._ti.task_id)
            and _same_map_index(map_index, self._ti.map_index)
        )
        if not own:
            return super().set(
                dag_id, run_id, task_id, key, value, map_index, dag_result=dag_result, mapped_length=mapped_length
            )
        from airflow.sdk.execution_time.comms import OKResponse

        if not self._held.hold_xcom(key, value, dag_result):
            return super().set(dag_id, run_id, task_id, key, value, map_index, dag_result=dag_result)
        return OKResponse(ok=True)

    def get_sequence_item(self, dag_id: str, run_id: str, task_id: str, key: str, offset: int):
        """Return one item of a mapped task's XComs, from the read-ahead window when it has it."""
        if self._read_ahead <= 0 or offset < 0:
            return super().get_sequence_item(dag_id, run_id, task_id, key, offset)

        from airflow.sdk.api.datamodels._generated import XComSequenceIndexResponse

        sequence = (dag_id, run_id, task_id, key)
        cached = self._windows.get(sequence)
        if cached is not None:
            start, values = cached
            if start <= offset < start + len(values):
                return XComSequenceIndexResponse(root=values[offset - start])
            if len(values) < self._read_ahead and offset >= start + len(values):
                # The last window was short, so this offset is past the end: no slice request needed.
                return super().get_sequence_item(dag_id, run_id, task_id, key, offset)

        # The slice route orders by map index and offsets exactly as the item route does.
        window = self.get_sequence_slice(dag_id, run_id, task_id, key, offset, offset + self._read_ahead, None)
        self._windows.pop(sequence, None)
        self._windows[sequence] = (offset, list(window.root))
        while len(self._windows) > _MAX_READ_AHEAD_WINDOWS:
            del self._windows[next(iter(self._windows))]
        if not window.root:
            # Past the end: the item route returns the "not found" the task expects.
            return super().get_sequence_item(dag_id, run_id, task_id, key, offset)
        return XComSequenceIndexResponse(root=window.root[0])


def _same_map_index(requested: int | None, own: int | None) -> bool:
    # The client sends no map index for -1 or None; both mean "not mapped".
    def normal(value: int | None) -> int:
        return -1 if value is None or value < 0 else value

    return normal(requested) == normal(own)


def _min_heartbeat_interval() -> float:
    from airflow.configuration import conf

    return conf.getfloat("workers", "min_heartbeat_interval")


def _conflict_error(
    client: Client, ti_id: uuid.UUID, reason: str, previous_state: str | None
) -> ServerResponseError:
    """Build the error the API server raises for the same conflict, so the supervisor reacts as it does."""
    if reason == "not_found":
        status = HTTPStatus.NOT_FOUND
        detail: dict[str, Any] = {"reason": "not_found", "message": "Task Instance not found"}
    else:
        status = HTTPStatus.CONFLICT
        detail = {
            "reason": "invalid_state",
            "message": "TI was not in the running state so it cannot be updated",
            "previous_state": previous_state,
        }
    request = httpx.Request("PATCH", client.base_url.join(f"task-instances/{ti_id}/state"))
    response = httpx.Response(status, json={"detail": detail}, request=request)
    error = ServerResponseError.from_response(response)
    if error is None:  # Only if httpx stopped setting the JSON content type.
        raise RuntimeError(f"Could not build the {status} error for ti_id={ti_id}")
    return error


class BatchingClient(Client):
    """
    Task SDK API client whose ``task_instances.succeed()`` is batched by DAG run.

    :param ti: the task instance this client's supervisor runs.
    :param sender: the transport's sending side.
    :param settings: the ``[dagrun_batching]`` settings.
    :param kwargs: passed to ``Client`` (``base_url``, ``token``, httpx options).
    """

    def __init__(self, *, ti: Any, sender: UpdateSender, settings: BatchingSettings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._held = HeldWrites(self, ti, settings.max_write_hold_seconds) if settings.fold_task_writes else None
        self._batching_task_instances = BatchingTaskInstanceOperations(
            self, ti=ti, sender=sender, settings=settings, held=self._held
        )
        self._batching_xcoms = BatchingXComOperations(
            self, ti=ti, held=self._held, read_ahead=settings.xcom_read_ahead
        )

    @property
    def task_instances(self) -> TaskInstanceOperations:
        """Operations on task instances, with batched success updates."""
        return self._batching_task_instances

    @property
    def xcoms(self) -> XComOperations:
        """Operations on XComs: the task's own return value is held, mapped results are read ahead."""
        return self._batching_xcoms

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any):
        """Send what is held first, so the server receives the task's writes in the order it made them."""
        if self._held is not None:
            try:
                self._held.flush()
            except Exception:
                # A failed write must not keep the task instance from its final state. Any other
                # request fails, as the write's own request would have.
                if not (method == "PATCH" and str(url).endswith("/state")):
                    raise
                log.warning("Held writes could not be sent before the state update.", exc_info=True)
        return super().request(method, url, *args, **kwargs)

    def close(self) -> None:
        """Send what is still held (a task that ended without a state update), then close."""
        if self._held is not None:
            self._held.close()
            try:
                self._held.flush()
            except Exception:
                log.warning("Held writes could not be sent before the client closed.", exc_info=True)
        super().close()


def _is_valid_server_url(server: str | None) -> bool:
    if not server:
        return False
    parsed = urlparse(server)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def run_workload(
    workload: Any, *, server: str, proctitle: str, sender: UpdateSender, settings: BatchingSettings
):
    """
    Run one workload as ``BaseExecutor.run_workload`` does, with a batching client for task workloads.

    Callbacks and connection tests, and a task whose server URL is invalid (so that Airflow raises its
    own error), take the stock path.
    """
    from airflow.executors.base_executor import BaseExecutor
    from airflow.executors.workloads import ExecuteTask

    if not isinstance(workload, ExecuteTask) or not _is_valid_server_url(server):
        return BaseExecutor.run_workload(
            workload, server=server, proctitle=proctitle, subprocess_logs_to_stdout=True
        )

    from airflow.sdk.execution_time.supervisor import supervise_task

    try:
        from setproctitle import setproctitle

        setproctitle(proctitle)
    except ImportError:
        pass

    # The limits the task SDK gives the client it creates itself when none is passed.
    client = BatchingClient(
        ti=workload.ti,
        sender=sender,
        settings=settings,
        base_url=server,
        token=workload.token,
        limits=httpx.Limits(max_keepalive_connections=1, max_connections=10),
    )
    try:
        return supervise_task(
            ti=workload.ti,
            bundle_info=workload.bundle_info,
            dag_rel_path=workload.dag_rel_path,
            token=workload.token,
            server=server,
            log_path=workload.log_path,
            subprocess_logs_to_stdout=True,
            client=client,
            sentry_integration=getattr(workload, "sentry_integration", ""),
        )
    finally:
        client.close()


def run_batching_worker(
    logger_name: str,
    input,
    output,
    unread_messages,
    team_conf,
    sender: UpdateSender,
    settings: BatchingSettings,
) -> None:
    """
    Serve workloads from the executor's queue: LocalExecutor's worker loop with :func:`run_workload`.

    Same queue protocol as ``airflow.executors.local_executor._run_worker`` in Airflow 3.3: a ``None``
    workload stops the worker, the running state is reported before the workload starts, and the
    success or failure state after it ends.
    """
    import structlog
    from airflow.executors.base_executor import get_execution_api_server_url
    from airflow.executors.local_executor import _get_executor_process_title_prefix

    # Ignore ctrl-c here, as LocalExecutor's workers do: running tasks are left to finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    worker_log = structlog.get_logger(logger_name)
    worker_log.info("Batching worker starting up pid=%d", os.getpid())
    prefix = _get_executor_process_title_prefix(team_conf.team_name)

    while True:
        _set_title(f"{prefix} <idle>")
        try:
            workload = input.get()
        except EOFError:
            worker_log.info(
                "Failed to read tasks from the task queue because the other end has closed the "
                "connection. Terminating worker %s.",
                multiprocessing.current_process().name,
            )
            break

        if workload is None:
            return

        with unread_messages:
            unread_messages.value -= 1

        if workload.running_state is not None:
            output.put((workload.key, workload.running_state, None))

        try:
            run_workload(
                workload,
                server=get_execution_api_server_url(team_conf),
                proctitle=f"{prefix} {workload.display_name}",
                sender=sender,
                settings=settings,
            )
            output.put((workload.key, workload.success_state, None))
        except Exception as e:  # noqa: BLE001 - reported to the scheduler as the workload's failure, as LocalExecutor does
            worker_log.exception("Workload execution failed.", workload_type=type(workload).__name__)
            output.put((workload.key, workload.failure_state, e))


def _set_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)
