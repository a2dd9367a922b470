"""
Worker side of DAG-run batching: LocalExecutor worker processes whose supervisors batch success updates.

Airflow's ``supervise_task()`` accepts a preconfigured API client. The worker passes a
:class:`BatchingClient`, a subclass of the task SDK's ``Client`` whose ``task_instances.succeed()`` hands
the update to the coalescer through a transport instead of sending ``PATCH /task-instances/{id}/state``.
Every other call, including ``finish()`` (failed), ``retry()`` (up_for_retry), deferral, reschedule,
heartbeats, rendered fields and XComs, goes to the API server unchanged. No Airflow class is patched.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx
from airflow.sdk.api.client import Client, ServerResponseError, TaskInstanceOperations

from kestra_perf_provider.dagrun_batching.exceptions import TransportError
from kestra_perf_provider.dagrun_batching.updates import OutcomeKind, StateUpdate

if TYPE_CHECKING:
    import uuid
    from datetime import datetime

    from kestra_perf_provider.dagrun_batching.transport import UpdateSender

log = logging.getLogger(__name__)


class BatchingTaskInstanceOperations(TaskInstanceOperations):
    """
    ``client.task_instances`` of a :class:`BatchingClient`: ``succeed()`` goes through the coalescer.

    :param client: the owning client, used for every other call and for the fallback.
    :param ti: the task instance the supervisor runs (``id``, ``try_number``, ``dag_id``, ``run_id``).
    :param sender: the transport's sending side.
    :param fallback_timeout: seconds to wait for the outcome before sending the stock request.
    """

    __slots__ = ("_fallback_timeout", "_sender", "_ti")

    def __init__(self, client: Client, *, ti: Any, sender: UpdateSender, fallback_timeout: float) -> None:
        super().__init__(client)
        self._ti = ti
        self._sender = sender
        self._fallback_timeout = fallback_timeout

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
        update = StateUpdate(
            ti_id=id,
            try_number=int(self._ti.try_number),
            dag_id=self._ti.dag_id,
            run_id=self._ti.run_id,
            payload=json.loads(body.model_dump_json()),
        )
        try:
            outcome = self._sender.send(update, timeout=self._fallback_timeout)
        except TransportError as err:
            log.warning("Batched success update not delivered; sending it to the API server. %s", err)
            return super().succeed(id, when, task_outlets, outlet_events, rendered_map_index)

        if outcome.kind is OutcomeKind.APPLIED:
            return None
        if outcome.kind is OutcomeKind.CONFLICT:
            raise _conflict_error(self.client, id, outcome.reason, outcome.previous_state)
        log.warning(
            "Batched success update fell back to the API server. ti_id=%s reason=%s", id, outcome.reason
        )
        return super().succeed(id, when, task_outlets, outlet_events, rendered_map_index)


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
    :param fallback_timeout: seconds to wait for a batched outcome before sending the stock request.
    :param kwargs: passed to ``Client`` (``base_url``, ``token``, httpx options).
    """

    def __init__(self, *, ti: Any, sender: UpdateSender, fallback_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._batching_task_instances = BatchingTaskInstanceOperations(
            self, ti=ti, sender=sender, fallback_timeout=fallback_timeout
        )

    @property
    def task_instances(self) -> TaskInstanceOperations:
        """Operations on task instances, with batched success updates."""
        return self._batching_task_instances


def _is_valid_server_url(server: str | None) -> bool:
    if not server:
        return False
    parsed = urlparse(server)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def run_workload(
    workload: Any, *, server: str, proctitle: str, sender: UpdateSender, fallback_timeout: float
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
        fallback_timeout=fallback_timeout,
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
    fallback_timeout: float,
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
                fallback_timeout=fallback_timeout,
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
