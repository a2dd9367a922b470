"""End-to-end checks of the deployment harness itself, on stock LocalExecutor."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.airflow_deployment import (
    SCENARIO_DAGS,
    AirflowDeployment,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

STATE_ROUTE = "PATCH /execution/task-instances/{id}/state"


def expected_value(item: int) -> int:
    # Mirrors scenario_dags/scenarios.py, which the dag-processor imports by path.
    return item * 3 + 1


class TestFanout:
    def test_fanout_reaches_success_once(self, stock_deployment: AirflowDeployment) -> None:
        with stock_deployment.measure() as measurement:
            run_id = stock_deployment.trigger("fanout", conf={"n": 5})
            state = stock_deployment.wait_for_run("fanout", run_id, timeout=180)

        assert state == "success"
        rows = stock_deployment.task_instances("fanout", run_id)
        mapped = [row for row in rows if row["task_id"] == "work"]
        assert sorted(row["map_index"] for row in mapped) == [0, 1, 2, 3, 4]
        assert {row["state"] for row in rows} == {"success"}
        assert {row["try_number"] for row in rows} == {1}
        history = stock_deployment.sql(
            "SELECT count(*) AS n FROM task_instance_history WHERE dag_id = 'fanout' AND run_id = %s",
            (run_id,),
        )
        assert history[0]["n"] == 0
        success_rows = stock_deployment.sql(
            "SELECT task_id, map_index, count(*) AS n FROM log "
            "WHERE dag_id = 'fanout' AND run_id = %s AND event = 'success' GROUP BY 1, 2",
            (run_id,),
        )
        assert sorted((row["task_id"], row["map_index"]) for row in success_rows) == sorted(
            (row["task_id"], row["map_index"]) for row in rows
        )
        assert {row["n"] for row in success_rows} == {1}

        fan_in = stock_deployment.xcom("fanout", run_id, "fan_in")
        assert fan_in == {"n": 5, "sum": sum(expected_value(item) for item in range(5))}

        figures = measurement.figures
        assert figures is not None
        assert figures.mapped_task_instances == 5
        assert figures.task_instances == len(rows)
        # Stock Airflow sends one terminal state update per task instance.
        assert figures.api_requests.get(STATE_ROUTE) == len(rows)
        assert figures.statements["api_server"].commits >= len(rows)
        assert figures.statements["scheduler"].transactions > 0
        assert figures.trigger_to_end_s is not None and figures.trigger_to_end_s > 0
        assert figures.cpu_s["api_server"] > 0
        assert figures.cpu_s["task_processes"] > 0
        assert figures.statement_evictions >= 0


class TestLockWaitInstruments:
    def test_deliberate_lock_wait_is_seen(self, stock_deployment: AirflowDeployment) -> None:
        stock_deployment.sql("CREATE TABLE IF NOT EXISTS lock_scratch (id int PRIMARY KEY, value int)")
        stock_deployment.sql("INSERT INTO lock_scratch VALUES (1, 0) ON CONFLICT DO NOTHING")
        holder = stock_deployment.connect("scheduler", application_name="af_test_holder")
        waiter = stock_deployment.connect("api_server", application_name="af_test_waiter")
        try:
            with stock_deployment.measure() as measurement:
                with holder.cursor() as cur:
                    cur.execute("UPDATE lock_scratch SET value = value + 1 WHERE id = 1")
                blocked = threading.Thread(target=_update_and_commit, args=(waiter,))
                blocked.start()
                time.sleep(0.6)
                holder.commit()
                blocked.join(timeout=30)
                assert not blocked.is_alive()
        finally:
            holder.close()
            waiter.close()

        figures = measurement.figures
        assert figures is not None
        sampled = [wait for wait in figures.sampled_lock_waits if wait.table == "lock_scratch"]
        assert len(sampled) == 1
        assert sampled[0].waiter == "api_server"
        assert sampled[0].blockers == ("scheduler",)
        assert sampled[0].observed_ms >= 300

        assert figures.logged_lock_waits is not None, "the PostgreSQL server log could not be read"
        logged = [wait for wait in figures.logged_lock_waits if wait.table == "lock_scratch"]
        assert len(logged) == 1
        assert logged[0].waiter == "api_server"
        assert logged[0].blockers == ("scheduler",)
        assert logged[0].wait_ms is not None and logged[0].wait_ms >= 300
        assert figures.lock_wait_summary()["count"] >= 1


def _update_and_commit(conn) -> None:
    with conn.cursor() as cur:
        cur.execute("UPDATE lock_scratch SET value = value + 1 WHERE id = 1")
    conn.commit()


class TestProcessCleanup:
    def test_no_process_left_after_exit(self, postgres_server: str) -> None:
        with AirflowDeployment(
            executor="LocalExecutor", dags_folder=SCENARIO_DAGS, parallelism=4
        ) as deployment:
            run_id = deployment.trigger("barrier", conf={"n": 3, "barrier_period": 30})
            _wait_for_running(deployment, "barrier", run_id, count=3)

            # Killing the scheduler alone leaves its executor workers and their task
            # processes running, orphaned, and teardown still has to stop them.
            deployment.kill("scheduler", whole_group=False)
            killed_at = time.time()
            orphans = deployment.session_processes()
            deployment.start("scheduler")
            deployment.wait_healthy(timeout=120, after=killed_at)
            dbname = deployment.dbname
            sessions = list(deployment.sessions)

        # The three components, the killed scheduler, and the killed one's survivors.
        assert len(sessions) == 4
        assert len(orphans) >= 3
        assert deployment.alive_started_processes() == []
        assert deployment.session_processes() == []
        assert _database_exists(postgres_server, dbname) is False


def _wait_for_running(deployment: AirflowDeployment, dag_id: str, run_id: str, *, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = deployment.task_instances(dag_id, run_id)
        if sum(row["state"] == "running" for row in rows) >= count:
            return
        time.sleep(0.5)
    pytest.fail(f"fewer than {count} task instances of {dag_id}/{run_id} running after 120 s: {rows}")


def _database_exists(dsn: str, dbname: str) -> bool:
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            return cur.fetchone() is not None
    finally:
        conn.close()
