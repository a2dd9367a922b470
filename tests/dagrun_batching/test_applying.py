"""
Tests of :class:`GroupApplier` against a real PostgreSQL database migrated by ``airflow db migrate``.

DAG runs and task instances are created through Airflow's ORM from the DAGs in ``dags/``, which
``airflow dags reserialize`` stores in the database first.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import create_engine, event, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import sessionmaker

from kestra_perf_provider.dagrun_batching.applying import GroupApplier
from kestra_perf_provider.dagrun_batching.updates import OutcomeKind, StateUpdate

pytestmark = pytest.mark.postgres

DAGS_FOLDER = Path(__file__).resolve().parent / "dags"
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
ASSET_PROFILE = {"name": "batching_apply_asset", "uri": "file:///tmp/batching_apply_asset", "type": "Asset"}
APPLIER_APP_NAME = "kpp_applier_test"


class RecordingMetrics:
    """Counts what the applier reports, so a test can see retries happen."""

    def __init__(self) -> None:
        self.retries = 0

    def group_applied(self, *, size: int, flush_latency_ms: float) -> None:
        pass

    def group_retried(self) -> None:
        self.retries += 1

    def updates_fell_back(self, count: int) -> None:
        pass

    def updates_conflicted(self, count: int) -> None:
        pass


def _admin(sql: str) -> None:
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    """Create a fresh database, migrate it with the Airflow CLI and store the test DAGs in it."""
    dbname = f"kpp_batching_apply_{uuid.uuid4().hex[:10]}"
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{dbname}"
    home = tmp_path_factory.mktemp("airflow_home")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_FOLDER),
    )
    airflow = str(Path(sys.executable).parent / "airflow")
    _admin(f'CREATE DATABASE "{dbname}"')
    try:
        for command in (["db", "migrate"], ["dags", "reserialize"]):
            result = subprocess.run(
                [airflow, *command], check=False, env=env, capture_output=True, timeout=300
            )
            assert result.returncode == 0, result.stderr.decode()[-3000:]
        yield url
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture(scope="module")
def engine(database_url):
    engine = create_engine(database_url, connect_args={"application_name": APPLIER_APP_NAME})
    with engine.begin() as conn:
        # The consumer must be unpaused, or the asset manager queues no run for it.
        conn.execute(text("UPDATE dag SET is_paused = false"))
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine):
    return sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)


@pytest.fixture
def dag_run(session_factory):
    """Create a running DAG run of ``batching_apply`` whose task instances all run try 1."""
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    now = datetime.datetime.now(datetime.UTC)
    with session_factory() as session:
        serialized = session.scalar(
            select(SerializedDagModel).where(SerializedDagModel.dag_id == "batching_apply")
        )
        run = serialized.dag.create_dagrun(
            run_id=f"test_{uuid.uuid4().hex[:8]}",
            run_after=now,
            run_type=DagRunType.MANUAL,
            triggered_by=DagRunTriggeredByType.TEST,
            state=DagRunState.RUNNING,
            session=session,
        )
        session.flush()
        tis = session.scalars(select(TaskInstance).where(TaskInstance.run_id == run.run_id)).all()
        for ti in tis:
            ti.state = TaskInstanceState.RUNNING
            ti.try_number = 1
            ti.start_date = now - datetime.timedelta(seconds=5)
            ti.hostname = "worker-1"
        session.commit()
        return {ti.task_id: ti for ti in tis}


def _update(
    ti,
    *,
    try_number: int = 1,
    outlets: bool | None = None,
    rendered: str | None = None,
    rendered_fields: dict | None = None,
    xcoms: tuple = (),
) -> StateUpdate:
    with_outlets = ti.task_id.startswith("produce") if outlets is None else outlets
    return StateUpdate(
        rendered_fields=rendered_fields,
        xcoms=xcoms,
        ti_id=ti.id,
        try_number=try_number,
        dag_id=ti.dag_id,
        run_id=ti.run_id,
        payload={
            "state": "success",
            "end_date": datetime.datetime.now(datetime.UTC).isoformat(),
            "task_outlets": [ASSET_PROFILE] if with_outlets else [],
            "outlet_events": [],
            "rendered_map_index": rendered,
        },
    )


def _group_key(tis) -> tuple[str, str]:
    ti = next(iter(tis.values()))
    return (ti.dag_id, ti.run_id)


def _rows(engine, run_id: str, query: str) -> list:
    with engine.connect() as conn:
        return conn.execute(text(query), {"run_id": run_id}).all()


def _success_logs(engine, run_id: str) -> dict[str, int]:
    rows = _rows(
        engine,
        run_id,
        "SELECT task_id, count(*) FROM log WHERE run_id = :run_id AND event = 'success' GROUP BY task_id",
    )
    return dict(rows)


def _deadline() -> float:
    return time.monotonic() + 30


@pytest.fixture
def statements(engine):
    """Record every SQL statement the engine sends, in order, including COMMIT."""
    recorded: list[str] = []

    def _before(conn, cursor, statement, parameters, context, executemany):
        recorded.append(" ".join(statement.split()))

    def _commit(conn):
        recorded.append("COMMIT")

    event.listen(engine, "before_cursor_execute", _before)
    event.listen(engine, "commit", _commit)
    yield recorded
    event.remove(engine, "before_cursor_execute", _before)
    event.remove(engine, "commit", _commit)


class TestGroupApplier:
    def test_group_applied_in_one_transaction(self, engine, session_factory, dag_run, statements):
        applier = GroupApplier(session_factory)
        updates = [_update(ti, rendered=f"label {ti.task_id}") for ti in dag_run.values()]
        run_id = _group_key(dag_run)[1]

        outcomes = applier(_group_key(dag_run), updates, _deadline())

        assert {outcome.kind for outcome in outcomes.values()} == {OutcomeKind.APPLIED}
        assert len(outcomes) == len(dag_run)
        rows = _rows(
            engine,
            run_id,
            "SELECT task_id, state, duration, rendered_map_index, xmin::text FROM task_instance "
            "WHERE run_id = :run_id",
        )
        assert {row.state for row in rows} == {"success"}
        assert all(row.duration >= 5 for row in rows)
        assert {row.task_id: row.rendered_map_index for row in rows} == {
            task_id: f"label {task_id}" for task_id in dag_run
        }
        log_xmins = _rows(engine, run_id, "SELECT xmin::text FROM log WHERE run_id = :run_id")
        # One writing transaction: every updated and inserted row carries its transaction id.
        assert len({row.xmin for row in rows} | {row.xmin for row in log_xmins}) == 1
        assert statements.count("COMMIT") == 1
        assert _success_logs(engine, run_id) == dict.fromkeys(dag_run, 1)

    def test_rows_locked_in_primary_key_order(self, session_factory, dag_run, statements):
        applier = GroupApplier(session_factory)
        updates = list(reversed([_update(ti) for ti in dag_run.values()]))

        applier(_group_key(dag_run), updates, _deadline())

        lock = [s for s in statements if "FOR UPDATE" in s and "FROM task_instance" in s]
        assert len(lock) == 1
        assert "ORDER BY task_instance.id" in lock[0]

    def test_log_row_matches_api_server(self, engine, session_factory, dag_run):
        applier = GroupApplier(session_factory)
        ti = dag_run["plain_0"]

        applier(_group_key(dag_run), [_update(ti)], _deadline())

        rows = _rows(
            engine,
            ti.run_id,
            "SELECT event, dag_id, task_id, map_index, try_number, owner, extra FROM log "
            "WHERE run_id = :run_id",
        )
        assert len(rows) == 1
        assert tuple(rows[0]) == (
            "success",
            "batching_apply",
            "plain_0",
            -1,
            1,
            "airflow",
            '{"host_name": "worker-1"}',
        )

    def test_cleared_ti_is_conflict(self, engine, session_factory, dag_run):
        from airflow.models.taskinstance import TaskInstance

        cleared, other = dag_run["plain_0"], dag_run["plain_1"]
        with session_factory() as session:
            session.execute(update(TaskInstance).where(TaskInstance.id == cleared.id).values(state=None))
            session.commit()
        applier = GroupApplier(session_factory)

        outcomes = applier(_group_key(dag_run), [_update(cleared), _update(other)], _deadline())

        assert outcomes[(cleared.id, 1)].kind is OutcomeKind.CONFLICT
        assert outcomes[(cleared.id, 1)].reason == "invalid_state"
        assert outcomes[(other.id, 1)].kind is OutcomeKind.APPLIED
        states = dict(
            _rows(engine, cleared.run_id, "SELECT task_id, state FROM task_instance WHERE run_id = :run_id")
        )
        assert states["plain_0"] is None
        assert states["plain_1"] == "success"
        assert _success_logs(engine, cleared.run_id) == {"plain_1": 1}

    def test_other_try_number_is_conflict(self, engine, session_factory, dag_run):
        from airflow.models.taskinstance import TaskInstance

        rerun = dag_run["plain_2"]
        with session_factory() as session:
            session.execute(update(TaskInstance).where(TaskInstance.id == rerun.id).values(try_number=2))
            session.commit()
        applier = GroupApplier(session_factory)

        outcomes = applier(_group_key(dag_run), [_update(rerun, try_number=1)], _deadline())

        assert outcomes[(rerun.id, 1)].kind is OutcomeKind.CONFLICT
        assert outcomes[(rerun.id, 1)].previous_state == "running"
        rows = _rows(
            engine,
            rerun.run_id,
            "SELECT state, end_date FROM task_instance WHERE task_id = 'plain_2' AND run_id = :run_id",
        )
        assert tuple(rows[0]) == ("running", None)
        assert _success_logs(engine, rerun.run_id) == {}

    def test_missing_ti_is_conflict(self, session_factory, dag_run):
        ti = dag_run["plain_0"]
        ghost = StateUpdate(
            ti_id=uuid.uuid4(), try_number=1, dag_id=ti.dag_id, run_id=ti.run_id, payload=_update(ti).payload
        )
        applier = GroupApplier(session_factory)

        outcomes = applier(_group_key(dag_run), [ghost], _deadline())

        assert outcomes[ghost.identity].kind is OutcomeKind.CONFLICT
        assert outcomes[ghost.identity].reason == "not_found"

    def test_same_update_twice_is_noop(self, engine, session_factory, dag_run):
        applier = GroupApplier(session_factory)
        updates = [_update(ti) for ti in dag_run.values()]
        key = _group_key(dag_run)

        first = applier(key, updates, _deadline())
        end_dates = _rows(
            engine, key[1], "SELECT task_id, end_date FROM task_instance WHERE run_id = :run_id"
        )
        second = applier(key, updates + updates, _deadline())

        assert all(outcome.kind is OutcomeKind.APPLIED for outcome in first.values())
        assert not any(outcome.already_applied for outcome in first.values())
        assert all(outcome.kind is OutcomeKind.APPLIED for outcome in second.values())
        assert all(outcome.already_applied for outcome in second.values())
        assert (
            _rows(engine, key[1], "SELECT task_id, end_date FROM task_instance WHERE run_id = :run_id")
            == end_dates
        )
        assert _success_logs(engine, key[1]) == dict.fromkeys(dag_run, 1)
        events = _rows(engine, key[1], "SELECT count(*) FROM asset_event WHERE source_run_id = :run_id")
        assert events[0][0] == 3

    def test_duplicate_in_one_group_applied_once(self, engine, session_factory, dag_run):
        applier = GroupApplier(session_factory)
        ti = dag_run["plain_3"]

        outcomes = applier(_group_key(dag_run), [_update(ti), _update(ti)], _deadline())

        assert outcomes[(ti.id, 1)].kind is OutcomeKind.APPLIED
        assert _success_logs(engine, ti.run_id) == {"plain_3": 1}

    def test_deadlock_on_first_attempt_is_retried(self, engine, session_factory, dag_run):
        attempts: list[int] = []

        def deadlock_once(stage: str, attempt: int) -> None:
            if stage == "before_commit":
                attempts.append(attempt)
                if attempt == 1:
                    raise OperationalError(
                        "COMMIT", {}, psycopg2.errors.DeadlockDetected("deadlock detected (injected)")
                    )

        metrics = RecordingMetrics()
        applier = GroupApplier(
            session_factory, metrics=metrics, fault_injector=deadlock_once, retry_initial_delay=0.01
        )
        key = _group_key(dag_run)

        outcomes = applier(key, [_update(ti) for ti in dag_run.values()], _deadline())

        assert attempts == [1, 2]
        assert metrics.retries == 1
        assert {outcome.kind for outcome in outcomes.values()} == {OutcomeKind.APPLIED}
        assert _success_logs(engine, key[1]) == dict.fromkeys(dag_run, 1)
        events = _rows(engine, key[1], "SELECT count(*) FROM asset_event WHERE source_run_id = :run_id")
        assert events[0][0] == 3

    def test_lost_connection_is_retried(self, engine, session_factory, dag_run):
        """The applier's own connection is terminated by the server while it holds the row locks."""

        def terminate_once(stage: str, attempt: int) -> None:
            if stage == "locked" and attempt == 1:
                killer = psycopg2.connect(PG_DSN, application_name="kpp_applier_killer")
                killer.autocommit = True
                with killer.cursor() as cur:
                    cur.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = %s AND state = 'idle in transaction'",
                        (APPLIER_APP_NAME,),
                    )
                    assert cur.fetchone()[0] == 1
                killer.close()

        metrics = RecordingMetrics()
        applier = GroupApplier(
            session_factory, metrics=metrics, fault_injector=terminate_once, retry_initial_delay=0.01
        )
        key = _group_key(dag_run)

        outcomes = applier(key, [_update(ti) for ti in dag_run.values()], _deadline())

        assert metrics.retries == 1
        assert {outcome.kind for outcome in outcomes.values()} == {OutcomeKind.APPLIED}
        assert _success_logs(engine, key[1]) == dict.fromkeys(dag_run, 1)

    def test_retries_stop_at_deadline(self, engine, session_factory, dag_run):
        def always_deadlock(stage: str, attempt: int) -> None:
            if stage == "before_commit":
                raise OperationalError("COMMIT", {}, psycopg2.errors.DeadlockDetected("injected"))

        applier = GroupApplier(session_factory, fault_injector=always_deadlock, retry_initial_delay=0.05)
        key = _group_key(dag_run)

        outcomes = applier(key, [_update(ti) for ti in dag_run.values()], time.monotonic() + 0.5)

        assert {outcome.kind for outcome in outcomes.values()} == {OutcomeKind.FELL_BACK}
        assert {
            row.state
            for row in _rows(engine, key[1], "SELECT state FROM task_instance WHERE run_id = :run_id")
        } == {"running"}
        assert _success_logs(engine, key[1]) == {}

    def test_non_transient_error_falls_back(self, engine, session_factory, dag_run):
        def integrity_error(stage: str, attempt: int) -> None:
            if stage == "before_commit":
                raise IntegrityError("INSERT", {}, psycopg2.errors.UniqueViolation("injected"))

        metrics = RecordingMetrics()
        applier = GroupApplier(session_factory, metrics=metrics, fault_injector=integrity_error)
        key = _group_key(dag_run)

        outcomes = applier(key, [_update(ti) for ti in dag_run.values()], _deadline())

        assert {outcome.kind for outcome in outcomes.values()} == {OutcomeKind.FELL_BACK}
        assert metrics.retries == 0
        assert _success_logs(engine, key[1]) == {}

    def test_rejected_value_falls_back_alone(self, engine, session_factory, dag_run):
        poisoned, other = dag_run["plain_5"], dag_run["plain_1"]
        # Valid JSON that PostgreSQL's jsonb rejects: it stores no NUL character.
        bad = _update(poisoned, xcoms=({"key": "return_value", "value": "a\u0000b", "dag_result": False},))
        good = _update(other, xcoms=({"key": "return_value", "value": 7, "dag_result": False},))
        metrics = RecordingMetrics()

        outcomes = GroupApplier(session_factory, metrics=metrics)(_group_key(dag_run), [bad, good], _deadline())

        assert outcomes[bad.identity].kind is OutcomeKind.FELL_BACK
        assert outcomes[good.identity].kind is OutcomeKind.APPLIED
        assert metrics.retries == 0
        assert _success_logs(engine, other.run_id) == {"plain_1": 1}
        xcoms = _rows(engine, other.run_id, "SELECT task_id, value FROM xcom WHERE run_id = :run_id")
        assert [tuple(row) for row in xcoms] == [("plain_1", 7)]

    def test_invalid_partition_key_falls_back(self, engine, session_factory, dag_run):
        ti = dag_run["produce_0"]
        bad = _update(ti)
        bad.payload["outlet_events"] = [
            {"dest_asset_key": {"name": "x", "uri": "y"}, "extra": {}, "partition_key": " "}
        ]
        applier = GroupApplier(session_factory)

        outcomes = applier(_group_key(dag_run), [bad], _deadline())

        assert outcomes[bad.identity].kind is OutcomeKind.FELL_BACK
        assert _success_logs(engine, ti.run_id) == {}

    def test_asset_queue_written_once_last(self, engine, session_factory, dag_run, statements):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM asset_dag_run_queue"))
        applier = GroupApplier(session_factory)
        key = _group_key(dag_run)
        producers = [ti for task_id, ti in dag_run.items() if task_id.startswith("produce")]
        assert len(producers) == 3

        outcomes = applier(key, [_update(ti) for ti in dag_run.values()], _deadline())

        assert {outcome.kind for outcome in outcomes.values()} == {OutcomeKind.APPLIED}
        queue_inserts = [
            i for i, s in enumerate(statements) if s.startswith("INSERT INTO asset_dag_run_queue")
        ]
        assert len(queue_inserts) == 1
        assert statements[queue_inserts[0] + 1] == "COMMIT"
        events = _rows(engine, key[1], "SELECT count(*) FROM asset_event WHERE source_run_id = :run_id")
        assert events[0][0] == 3
        with engine.connect() as conn:
            queued = conn.execute(text("SELECT target_dag_id FROM asset_dag_run_queue")).scalars().all()
        assert queued == ["batching_apply_consumer"]

    def test_held_writes_commit_with_success(self, engine, session_factory, dag_run, statements):
        applier = GroupApplier(session_factory)
        key = _group_key(dag_run)
        updates = [
            _update(
                ti,
                rendered_fields={"op_args": f"[{ti.task_id!r}]", "password": "s3cr3t"},
                xcoms=({"key": "return_value", "value": {"task": ti.task_id}, "dag_result": False},),
            )
            for ti in dag_run.values()
        ]

        outcomes = applier(key, updates, _deadline())

        assert {outcome.kind for outcome in outcomes.values()} == {OutcomeKind.APPLIED}
        assert statements.count("COMMIT") == 1
        xcoms = _rows(
            engine, key[1], "SELECT task_id, key, value, xmin::text FROM xcom WHERE run_id = :run_id"
        )
        assert {(row.task_id, row.key) for row in xcoms} == {(t, "return_value") for t in dag_run}
        # XCom values are stored as JSON; a downstream task reads them back through the same model.
        assert {row.task_id: row.value for row in xcoms} == {t: {"task": t} for t in dag_run}
        rtif = _rows(
            engine,
            key[1],
            "SELECT task_id, rendered_fields, xmin::text FROM rendered_task_instance_fields "
            "WHERE run_id = :run_id",
        )
        assert {row.task_id for row in rtif} == set(dag_run)
        fields = {row.task_id: row.rendered_fields for row in rtif}
        assert fields["plain_0"]["op_args"] == "['plain_0']"
        # Redacted on the way in, as PUT /rtif does for fields that look like secrets.
        assert fields["plain_0"]["password"] == "***"
        states = _rows(engine, key[1], "SELECT xmin::text FROM task_instance WHERE run_id = :run_id")
        # The state, the XComs and the rendered fields were written by the same transaction.
        assert len({row.xmin for row in (*xcoms, *rtif, *states)}) == 1

    def test_conflict_writes_nothing_held(self, engine, session_factory, dag_run):
        from airflow.models.taskinstance import TaskInstance

        cleared = dag_run["plain_4"]
        with session_factory() as session:
            session.execute(update(TaskInstance).where(TaskInstance.id == cleared.id).values(state=None))
            session.commit()
        held = _update(
            cleared,
            rendered_fields={"op_args": "[]"},
            xcoms=({"key": "return_value", "value": 1, "dag_result": False},),
        )

        outcomes = GroupApplier(session_factory)(_group_key(dag_run), [held], _deadline())

        assert outcomes[held.identity].kind is OutcomeKind.CONFLICT
        # The supervisor sends its held writes itself after a conflict, as stock Airflow would have.
        assert _rows(engine, cleared.run_id, "SELECT 1 FROM xcom WHERE run_id = :run_id") == []
        assert (
            _rows(engine, cleared.run_id, "SELECT 1 FROM rendered_task_instance_fields WHERE run_id = :run_id")
            == []
        )
