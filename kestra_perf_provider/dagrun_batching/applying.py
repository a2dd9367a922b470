"""
Application of one DAG run's success updates in one database transaction.

:class:`GroupApplier` does, for a group, what Airflow 3.3's ``PATCH /task-instances/{id}/state`` does
for one success update, in this order:

1. ``SELECT ... FOR UPDATE`` of the group's ``task_instance`` rows, ordered by id. Groups lock in id
   order and the API server locks one row per transaction, so neither can deadlock with a group on
   these rows. A deadlock with another writer that locks several rows in another order is retried.
2. A check of each update as the API server makes it, plus the try number: a row that is already
   ``success`` for the same try is an update applied before (reported as applied, nothing written);
   a row that is missing, not ``running``, or running another try is a conflict and is left alone.
3. The writes each supervisor held back to commit with its success (``fold_task_writes``): its
   rendered template fields, through ``RenderedTaskInstanceFields.write`` as ``PUT /rtif`` does, and
   its return-value XCom, through ``XComModel.set`` as ``POST /xcoms`` does.
4. The asset events of each task, through Airflow's own ``TaskInstance.register_asset_changes_in_db``.
5. One ``UPDATE ... FROM (VALUES ...)`` of state, end_date, duration, rendered_map_index,
   next_method and next_kwargs for all applied rows, then one multi-row insert of their ``log`` rows,
   then the state-store cleanup when ``[state_store] clear_on_success`` is set.
6. One ``INSERT ... ON CONFLICT DO NOTHING`` into ``asset_dag_run_queue`` with each (asset, consumer
   DAG) pair once, as the last statement before the single ``COMMIT``. The API server writes the same
   row once per task, before its other statements, and holds its lock until its commit.

Asset listeners (``on_asset_changed``, ``on_asset_event_emitted``) run after the commit, as they do
on the API server. A transient database error (deadlock, serialization failure, lost connection)
rolls the group back and retries it with exponential backoff until the group's deadline; after
that, every update of the group falls back to the stock API path. Any other error rolls the group
back and applies its updates one transaction each, so only the update that fails falls back.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Boolean, case, event, extract, select, update, values
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.dml import OnConflictDoNothing
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.sql import column

from kestra_perf_provider.dagrun_batching.metrics import BatchingMetrics, NullMetrics
from kestra_perf_provider.dagrun_batching.updates import GroupKey, Outcome, OutcomeKind, StateUpdate

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState, Session

log = logging.getLogger(__name__)

FaultInjector = Callable[[str, int], None]
"""
``inject(stage, attempt)``, called in each attempt at ``"begin"`` (before any statement), ``"locked"``
(after the row locks) and ``"before_commit"``; it may raise to simulate a database failure, or
sleep to hold updates back. A test seam.
"""

# SQLSTATE codes after which the same transaction may succeed when run again.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "08000", "08003", "08006"})

# Longest identifier the metadata database stores for a partition key (``airflow.models.base.ID_LEN``).
_PARTITION_KEY_MAX_LENGTH = 250


def is_retryable(error: BaseException) -> bool:
    """Tell whether a failed group may succeed when its transaction is run again."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, (OperationalError, InterfaceError)):
        return True
    code = getattr(getattr(error, "orig", None), "pgcode", None)
    return code in _RETRYABLE_SQLSTATES


@dataclass(frozen=True)
class _Checked:
    update: StateUpdate
    payload: Any  # the API server's TISuccessStatePayload
    ti: Any  # the locked airflow.models.taskinstance.TaskInstance
    owners: str | None  # dag.owners, written into the log row as the API server does


class GroupApplier:
    """
    Apply a group of success updates of one DAG run in one transaction, with retries.

    An instance is the ``apply_group`` function of a :class:`~.coalescing.Coalescer`.

    :param session_factory: returns a new ``Session`` bound to the metadata database; the applier
        opens one per attempt and closes it.
    :param retry_initial_delay: upper bound of the first retry's random delay, in seconds; it doubles
        per retry up to ``retry_max_delay``.
    :param retry_max_delay: longest delay between two attempts, in seconds.
    :param metrics: receiver of retry counts.
    :param fault_injector: test seam; see :data:`FaultInjector`.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        *,
        retry_initial_delay: float = 0.05,
        retry_max_delay: float = 1.0,
        metrics: BatchingMetrics | None = None,
        fault_injector: FaultInjector | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._retry_initial_delay = retry_initial_delay
        self._retry_max_delay = retry_max_delay
        self._metrics = metrics or NullMetrics()
        self._fault_injector = fault_injector

    def __call__(
        self, key: GroupKey, updates: Sequence[StateUpdate], deadline: float
    ) -> dict[tuple, Outcome]:
        """
        Apply ``updates`` (all of DAG run ``key``) and return the outcome of each by identity.

        :param deadline: :func:`time.monotonic` value after which no retry starts; the updates then
            fall back.
        """
        attempt = 0
        delay = self._retry_initial_delay
        while True:
            attempt += 1
            try:
                return self.apply_once(key, updates, attempt=attempt)
            except Exception as err:
                if not is_retryable(err):
                    unique = list({upd.identity: upd for upd in updates}.values())
                    if len(unique) > 1:
                        # One update's data can fail the whole transaction (a value the database
                        # rejects); applied one by one, only that update falls back.
                        log.exception(
                            "Group apply failed with a non-transient error; applying its %d updates "
                            "one by one. dag_id=%s run_id=%s",
                            len(unique),
                            *key,
                        )
                        return self._apply_one_by_one(key, unique, deadline)
                    log.exception(
                        "Update apply failed with a non-transient error; it falls back. ti_id=%s "
                        "dag_id=%s run_id=%s",
                        unique[0].ti_id,
                        *key,
                    )
                    return _all(updates, Outcome.fell_back(f"apply failed: {type(err).__name__}"))
                pause = random.uniform(0, delay)
                if time.monotonic() + pause >= deadline:
                    log.warning(
                        "Group apply failed %d times and its deadline is near; %d updates fall back. "
                        "dag_id=%s run_id=%s error=%s",
                        attempt,
                        len(updates),
                        key[0],
                        key[1],
                        err,
                    )
                    return _all(updates, Outcome.fell_back(f"retries exhausted: {type(err).__name__}"))
                log.warning(
                    "Group apply failed with a transient error; retrying in %.3f s. attempt=%d "
                    "dag_id=%s run_id=%s error=%s",
                    pause,
                    attempt,
                    key[0],
                    key[1],
                    err,
                )
                self._metrics.group_retried()
                time.sleep(pause)
                delay = min(delay * 2, self._retry_max_delay)

    def _apply_one_by_one(
        self, key: GroupKey, updates: Sequence[StateUpdate], deadline: float
    ) -> dict[tuple, Outcome]:
        outcomes: dict[tuple, Outcome] = {}
        for upd in updates:
            outcomes.update(self(key, [upd], deadline))
        return outcomes

    def apply_once(self, key: GroupKey, updates: Sequence[StateUpdate], *, attempt: int = 1) -> dict:
        """
        Run one attempt: one transaction that commits every applicable update of the group.

        :raises Exception: whatever the database raised; the transaction is rolled back.
        """
        outcomes: dict[tuple, Outcome] = {}
        unique: dict[tuple, StateUpdate] = {}
        for upd in updates:
            if upd.group_key != key:
                raise ValueError(
                    f"Update of ti_id={upd.ti_id} belongs to {upd.group_key}, not to group {key}"
                )
            unique.setdefault(upd.identity, upd)

        asset_callbacks: list[Callable[[], None]] = []
        session = self._session_factory()
        try:
            self._inject("begin", attempt)
            checked = self._lock_and_check(session, list(unique.values()), outcomes)
            self._inject("locked", attempt)
            if checked:
                _write_held_writes(session, checked)
                with _deferred_asset_queue_inserts(session) as queue_rows:
                    for item in checked:
                        asset_callbacks.extend(self._register_assets(session, item))
                    self._write_rows(session, key, checked)
                    self._inject("before_commit", attempt)
                # Last statement of the transaction: the queue rows are the ones the scheduler also
                # locks when it creates the consumer's run, so they are held for the shortest time.
                _insert_asset_queue_rows(session, queue_rows)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

        for item in checked:
            outcomes[item.update.identity] = Outcome(kind=OutcomeKind.APPLIED)
        for callback in asset_callbacks:
            callback()
        return outcomes

    def _inject(self, stage: str, attempt: int) -> None:
        if self._fault_injector is not None:
            self._fault_injector(stage, attempt)

    def _lock_and_check(
        self, session: Session, updates: list[StateUpdate], outcomes: dict[tuple, Outcome]
    ) -> list[_Checked]:
        from airflow.api_fastapi.execution_api.datamodels.taskinstance import TISuccessStatePayload
        from airflow.models.dag import DagModel
        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.utils.state import TaskInstanceState

        payloads: dict[tuple, Any] = {}
        for upd in updates:
            reason = _invalid_payload_reason(upd.payload)
            if reason is None:
                try:
                    payloads[upd.identity] = TISuccessStatePayload.model_validate(upd.payload)
                except ValueError as err:
                    reason = f"invalid payload: {err}"
            if reason is not None:
                # The API server rejects such a body with a 422; the stock path reports it the same way.
                outcomes[upd.identity] = Outcome.fell_back(reason)

        ids = sorted({upd.ti_id for upd in updates if upd.identity in payloads})
        if not ids:
            return []
        # Locking in primary-key order keeps two groups from deadlocking on these rows. ``of=TI`` leaves
        # the joined dag_run and dag rows unlocked, as the API server does.
        statement = (
            select(TI, DagModel.owners)
            .join(DagModel, DagModel.dag_id == TI.dag_id)
            .where(TI.id.in_(ids))
            .order_by(TI.id)
            .with_for_update(of=TI)
        )
        rows = {ti.id: (ti, owners) for ti, owners in session.execute(statement).unique()}

        checked: list[_Checked] = []
        for upd in updates:
            if upd.identity not in payloads:
                continue
            ti, owners = rows.get(upd.ti_id, (None, None))
            if ti is None or (ti.dag_id, ti.run_id) != upd.group_key:
                outcomes[upd.identity] = _conflict(upd, "not_found", None)
                continue
            if ti.try_number == upd.try_number and ti.state == TaskInstanceState.SUCCESS:
                outcomes[upd.identity] = Outcome(kind=OutcomeKind.APPLIED, already_applied=True)
                continue
            if ti.state != TaskInstanceState.RUNNING or ti.try_number != upd.try_number:
                outcomes[upd.identity] = _conflict(upd, "invalid_state", _state_name(ti.state), ti.try_number)
                continue
            checked.append(_Checked(update=upd, payload=payloads[upd.identity], ti=ti, owners=owners))
        return checked

    @staticmethod
    def _register_assets(session: Session, item: _Checked) -> Sequence[Callable[[], None]]:
        from airflow.models.taskinstance import TaskInstance as TI

        return TI.register_asset_changes_in_db(
            item.ti, item.payload.task_outlets, item.payload.outlet_events, session=session
        )

    def _write_rows(self, session: Session, key: GroupKey, checked: list[_Checked]) -> None:
        from airflow.models.log import Log
        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.utils.state import TaskInstanceState

        table = TI.__table__
        rows = [
            {
                "ti_id": item.ti.id,
                "end_date": item.payload.end_date,
                "set_rmi": "rendered_map_index" in item.payload.model_fields_set,
                "rmi": item.payload.rendered_map_index,
            }
            for item in checked
        ]
        source = values(
            column("ti_id", table.c.id.type),
            column("end_date", table.c.end_date.type),
            column("set_rmi", Boolean()),
            column("rmi", table.c.rendered_map_index.type),
            name="batched_update",
        ).data([(r["ti_id"], r["end_date"], r["set_rmi"], r["rmi"]) for r in rows])
        statement = (
            update(table)
            .where(table.c.id == source.c.ti_id)
            .values(
                state=TaskInstanceState.SUCCESS,
                end_date=source.c.end_date,
                # The API server computes the duration the same way: EXTRACT(EPOCH FROM end - start).
                duration=extract("EPOCH", source.c.end_date - table.c.start_date),
                rendered_map_index=case((source.c.set_rmi, source.c.rmi), else_=table.c.rendered_map_index),
                next_method=None,
                next_kwargs=None,
            )
        )
        session.execute(statement)

        session.add_all(
            [
                Log(
                    event=TaskInstanceState.SUCCESS.value,
                    task_id=item.ti.task_id,
                    dag_id=item.ti.dag_id,
                    run_id=item.ti.run_id,
                    map_index=item.ti.map_index,
                    try_number=item.ti.try_number,
                    logical_date=item.ti.dag_run.logical_date,
                    owner=item.owners,
                    extra=json.dumps({"host_name": item.ti.hostname}) if item.ti.hostname else None,
                )
                for item in checked
            ]
        )
        session.flush()
        _clear_task_state_on_success(session, checked)
        _emit_task_spans(checked)


def _write_held_writes(session: Session, checked: list[_Checked]) -> None:
    """Write the rendered fields and XComs the supervisors held, as the API server's routes do."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel

    rendered_tasks: set[tuple[str, str]] = set()
    for item in checked:
        update = item.update
        if update.rendered_fields is not None:
            rtif = RenderedTaskInstanceFields(
                ti=item.ti, render_templates=False, rendered_fields=dict(update.rendered_fields)
            )
            rtif.write(session=session)
            rendered_tasks.add((item.ti.dag_id, item.ti.task_id))
        for xcom in update.xcoms:
            XComModel.set(
                key=xcom["key"],
                value=xcom["value"],
                dag_id=item.ti.dag_id,
                task_id=item.ti.task_id,
                run_id=item.ti.run_id,
                map_index=item.ti.map_index,
                serialize=False,
                dag_result=bool(xcom.get("dag_result")),
                session=session,
            )
    if rendered_tasks:
        session.flush()
    # PUT /rtif trims old runs' rows after each write; once per task of the group leaves the same rows.
    for dag_id, task_id in sorted(rendered_tasks):
        RenderedTaskInstanceFields.delete_old_records(task_id, dag_id, session=session)


def _all(updates: Sequence[StateUpdate], outcome: Outcome) -> dict[tuple, Outcome]:
    return {upd.identity: outcome for upd in updates}


def _conflict(
    update: StateUpdate, reason: str, previous_state: str | None, current_try: int | None = None
) -> Outcome:
    log.info(
        "Success update not applied: the task instance is not running this try. ti_id=%s "
        "try_number=%s reason=%s state=%s current_try_number=%s dag_id=%s run_id=%s",
        update.ti_id,
        update.try_number,
        reason,
        previous_state,
        current_try,
        update.dag_id,
        update.run_id,
    )
    return Outcome(kind=OutcomeKind.CONFLICT, reason=reason, previous_state=previous_state)


def _state_name(state: Any) -> str | None:
    if state is None:
        return None
    return str(getattr(state, "value", state))


def _invalid_payload_reason(payload: Mapping[str, Any]) -> str | None:
    """Return why the API server would reject this success body with a 422, or None if it would not."""
    for outlet_event in payload.get("outlet_events") or ():
        partition_key = outlet_event.get("partition_key") if isinstance(outlet_event, Mapping) else None
        if partition_key is None:
            continue
        if not str(partition_key).strip():
            return "an outlet event has an empty partition_key"
        if len(partition_key) > _PARTITION_KEY_MAX_LENGTH:
            return "an outlet event has a partition_key longer than the database column"
    return None


def _clear_task_state_on_success(session: Session, checked: list[_Checked]) -> None:
    from airflow.configuration import conf

    if not conf.getboolean("state_store", "clear_on_success", fallback=False):
        return
    from airflow._shared.state import TaskScope
    from airflow.state import get_state_backend

    backend = get_state_backend()
    for item in checked:
        ti = item.ti
        scope = TaskScope(
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            map_index=ti.map_index if ti.map_index is not None else -1,
        )
        try:
            backend.clear(scope, session=session)
        except Exception:
            # The API server logs and goes on in this case too: a stale state key is not worth a failed task.
            log.warning("Failed to clear task state on success. ti_id=%s", ti.id, exc_info=True)


def _emit_task_spans(checked: list[_Checked]) -> None:
    from airflow.configuration import conf

    if not conf.getboolean("traces", "otel_on", fallback=False):
        return
    # Imported only when tracing is on: the route module pulls in the whole execution API app.
    from airflow.api_fastapi.execution_api.routes.task_instances import _emit_task_span
    from airflow.utils.state import TaskInstanceState

    for item in checked:
        try:
            _emit_task_span(item.ti, state=TaskInstanceState.SUCCESS)
        except Exception:
            log.warning("Failed to emit task span. ti_id=%s", item.ti.id, exc_info=True)


@contextmanager
def _deferred_asset_queue_inserts(session: Session) -> Iterator[set[tuple[int, str]]]:
    """
    Collect the ``asset_dag_run_queue`` inserts that Airflow's asset manager runs on ``session``.

    ``AssetManager`` (PostgreSQL path) queues consumer DAGs with
    ``INSERT ... VALUES (:asset_id, :target_dag_id) ON CONFLICT DO NOTHING``, once per task and asset.
    A ``do_orm_execute`` hook on this session only turns each such statement into rows of a set, so
    the group writes each (asset, DAG) pair once, last. Any other statement runs unchanged.
    """
    from airflow.models.asset import AssetDagRunQueue

    rows: set[tuple[int, str]] = set()
    table = AssetDagRunQueue.__table__

    def _collect(state: ORMExecuteState):
        statement = state.statement
        if not state.is_insert or getattr(getattr(statement, "table", None), "name", None) != table.name:
            return None
        if not isinstance(getattr(statement, "_post_values_clause", None), OnConflictDoNothing):
            return None
        asset_id = _bound_value(statement, "asset_id")
        parameters = state.parameters
        if isinstance(parameters, Mapping):
            parameters = [parameters]
        if asset_id is None or not parameters:
            return None
        if not all(isinstance(p, Mapping) and p.get("target_dag_id") for p in parameters):
            return None
        rows.update((int(asset_id), str(p["target_dag_id"])) for p in parameters)
        return IteratorResult(SimpleResultMetaData([]), iter(()))

    event.listen(session, "do_orm_execute", _collect)
    try:
        yield rows
    finally:
        event.remove(session, "do_orm_execute", _collect)


def _bound_value(statement: Any, column_name: str) -> Any:
    """Return the value an ``INSERT ... .values(column=value)`` binds to ``column_name``, or None."""
    for target, bound in (getattr(statement, "_values", None) or {}).items():
        if getattr(target, "name", target) == column_name:
            return getattr(bound, "value", None)
    return None


def _insert_asset_queue_rows(session: Session, rows: set[tuple[int, str]]) -> None:
    if not rows:
        return
    from airflow.models.asset import AssetDagRunQueue

    # Sorted, so two groups that queue the same consumers take the row locks in the same order.
    ordered = [{"asset_id": asset_id, "target_dag_id": dag_id} for asset_id, dag_id in sorted(rows)]
    session.execute(pg_insert(AssetDagRunQueue).values(ordered).on_conflict_do_nothing())
