"""
End-to-end tests of ``BatchingLocalExecutor`` on a real Airflow deployment (api-server, scheduler,
dag-processor, PostgreSQL), using the ``fanout`` scenario DAG: ``items`` returns ``range(n)``, the
mapped ``work`` task returns a value per item, and ``fan_in`` fails unless it reads every value once.

Whether an update was batched is read from the api-server's access log: a batched success sends no
``PATCH /execution/task-instances/{id}/state``, a stock or fallen-back one sends exactly one.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import psycopg2
import pytest
import requests

from tests.dagrun_batching.dags.executors import HOLD_SECONDS_ENV, MARKER_DIR_ENV
from tests.support.airflow_deployment import (
    SCENARIO_DAGS,
    AirflowDeployment,
    admin_dsn,
    count_api_requests,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

BATCHING = "kestra_perf_provider.executors.BatchingLocalExecutor"
TEST_EXECUTORS = "tests.dagrun_batching.dags.executors"
STATE_ROUTE = "PATCH /execution/task-instances/{id}/state"
_XCOM_POST = re.compile(r"method=POST path=/execution/xcoms/[^/\s]+/[^/\s]+/([^/\s]+)/([^/\s?]+)")
N = 12
RUN_TIMEOUT = 240.0
# Parallelism above N + 2, so every task of a run can run at once.
PARALLELISM = 16


def _deployment(executor: str, **extra_env: str) -> AirflowDeployment:
    env = {"AIRFLOW__DAGRUN_BATCHING__LINGER_MS": "50", **extra_env}
    return AirflowDeployment(
        executor=executor, dags_folder=SCENARIO_DAGS, extra_env=env, parallelism=PARALLELISM
    )


class ApiLog:
    """Counts the api-server's requests by route from the moment it is created."""

    def __init__(self, deployment: AirflowDeployment) -> None:
        self.path = deployment.components["api_server"].log_path
        self.offset = self.path.stat().st_size

    def state_patches(self) -> int:
        return self.routes().get(STATE_ROUTE, 0)

    def routes(self) -> dict[str, int]:
        return count_api_requests(self.path, self.offset)

    def xcom_posts(self) -> list[tuple[str, str]]:
        """Return ``(task_id, key)`` of every ``POST /execution/xcoms`` in arrival order."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            text = handle.read().decode("utf-8", errors="replace")
        return _XCOM_POST.findall(text)


def _scheduler_log(deployment: AirflowDeployment) -> str:
    return deployment.components["scheduler"].log_path.read_text(errors="replace")


def _assert_run_complete(
    deployment: AirflowDeployment, run_id: str, n: int = N, *, first_try: bool = True
) -> list[dict]:
    """
    Check every task instance succeeded once, with one success log row, and fan_in saw every value.

    :param first_try: also check that no task instance needed a second try.
    """
    tis = deployment.task_instances("fanout", run_id)
    mapped = [ti for ti in tis if ti["task_id"] == "work"]
    assert sorted(ti["map_index"] for ti in mapped) == list(range(n))
    assert {ti["state"] for ti in tis} == {"success"}, tis
    if first_try:
        assert {ti["try_number"] for ti in tis} == {1}, tis

    logged = deployment.sql(
        "SELECT task_id, map_index, try_number, count(*) AS n FROM log "
        "WHERE dag_id = 'fanout' AND run_id = %s AND event = 'success' GROUP BY 1, 2, 3",
        (run_id,),
    )
    # Exactly once: one success row per task instance and try, whichever path applied it.
    assert Counter((row["task_id"], row["map_index"]) for row in logged) == Counter(
        (ti["task_id"], ti["map_index"]) for ti in tis
    )
    assert {row["n"] for row in logged} == {1}

    result = deployment.xcom("fanout", run_id, "fan_in")
    assert result == {"n": n, "sum": sum(item * 3 + 1 for item in range(n))}
    return tis


def _assert_writes_folded(deployment: AirflowDeployment, api: ApiLog, *, runs: int) -> None:
    """
    Check that rendered fields and return values were written with the successes, not on their own.

    The mapped ``work`` tasks send neither. ``items`` pushes its return value at once, because it feeds
    a mapped task and the API server checks its length. ``fan_in`` returns a dict, so it pushes one
    XCom per key at once. In both, that push sends the held rendered fields first, in task order.
    """
    routes = api.routes()
    assert routes.get("PUT /execution/task-instances/{id}/rtif", 0) == 2 * runs, routes
    # Tasks this short send no heartbeat: PATCH /run recorded the first one.
    assert routes.get("PUT /execution/task-instances/{id}/heartbeat", 0) == 0, routes
    # fan_in reads its 12 inputs through one slice request. Only the read past the end goes to the
    # item route, whose "not found" ends the iteration.
    assert routes.get("GET /execution/xcoms/{id}/{id}/{id}/{id}/slice", 0) == runs, routes
    assert routes.get("GET /execution/xcoms/{id}/{id}/{id}/{id}/item/{id}", 0) == runs, routes
    posted = Counter(api.xcom_posts())
    assert posted == Counter({("items", "return_value"): runs, ("fan_in", "n"): runs, ("fan_in", "sum"): runs})
    rendered = deployment.sql(
        "SELECT t.task_id, t.map_index, r.rendered_fields FROM task_instance t "
        "LEFT JOIN rendered_task_instance_fields r USING (dag_id, task_id, run_id, map_index) "
        "WHERE t.dag_id = 'fanout'"
    )
    assert len(rendered) == runs * _task_count(), rendered
    missing = [(row["task_id"], row["map_index"]) for row in rendered if row["rendered_fields"] is None]
    assert missing == []
    work = [row for row in rendered if row["task_id"] == "work"]
    assert all("op_args" in row["rendered_fields"] for row in work), work[:3]


def _end_dead_scheduler_sessions(deployment: AirflowDeployment) -> None:
    """
    End the database sessions of a scheduler that was killed alone.

    LocalExecutor's worker processes keep inherited copies of the scheduler's database sockets, so
    PostgreSQL does not end the dead scheduler's sessions while they live. A session killed inside a
    transaction keeps its row locks and would block the new scheduler; the server ends such sessions
    once every copy of the socket is closed, which a crash of the whole host would do.
    """
    [role] = [role for role, component in deployment.roles.items() if component == "scheduler"]
    admin = psycopg2.connect(admin_dsn())
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s AND datname = %s",
                (role, deployment.dbname),
            )
    finally:
        admin.close()


def _task_count(n: int = N) -> int:
    return n + 2  # items, the mapped work tasks and fan_in


class TestBatchingLocalExecutor:
    def test_fanout_and_two_runs_batched(self):
        with _deployment(BATCHING) as deployment:
            api = ApiLog(deployment)
            run_id = deployment.trigger("fanout", conf={"n": N})
            assert deployment.wait_for_run("fanout", run_id, timeout=RUN_TIMEOUT) == "success"
            _assert_run_complete(deployment, run_id)

            first, second = (deployment.trigger("fanout", conf={"n": N}) for _ in range(2))
            states = [deployment.wait_for_run("fanout", r, timeout=RUN_TIMEOUT) for r in (first, second)]
            assert states == ["success", "success"]
            _assert_run_complete(deployment, first)
            _assert_run_complete(deployment, second)

            assert api.state_patches() == 0
            assert "DAG-run batching is on" in _scheduler_log(deployment)
            _assert_writes_folded(deployment, api, runs=3)

    def test_failed_apply_retried(self):
        with _deployment(f"{TEST_EXECUTORS}.DeadlockOnceExecutor") as deployment:
            api = ApiLog(deployment)
            run_id = deployment.trigger("fanout", conf={"n": N})

            assert deployment.wait_for_run("fanout", run_id, timeout=RUN_TIMEOUT) == "success"
            _assert_run_complete(deployment, run_id)
            assert api.state_patches() == 0
            assert "Group apply failed with a transient error; retrying" in _scheduler_log(deployment)

    def test_failing_apply_falls_back(self):
        with _deployment(
            f"{TEST_EXECUTORS}.AlwaysFailingExecutor", AIRFLOW__DAGRUN_BATCHING__FALLBACK_TIMEOUT="2"
        ) as deployment:
            api = ApiLog(deployment)
            run_id = deployment.trigger("fanout", conf={"n": N})

            assert deployment.wait_for_run("fanout", run_id, timeout=RUN_TIMEOUT) == "success"
            _assert_run_complete(deployment, run_id)
            # Every success reached the api-server through the stock path, once.
            assert api.state_patches() == _task_count()

    def test_scheduler_killed_with_pending_updates(self, tmp_path: Path):
        markers = tmp_path / "held"
        markers.mkdir()
        with _deployment(
            f"{TEST_EXECUTORS}.SlowApplyExecutor",
            **{
                MARKER_DIR_ENV: str(markers),
                HOLD_SECONDS_ENV: "30",
                "AIRFLOW__DAGRUN_BATCHING__FALLBACK_TIMEOUT": "600",
            },
        ) as deployment:
            api = ApiLog(deployment)
            run_id = deployment.trigger("fanout", conf={"n": N})
            deadline = time.monotonic() + RUN_TIMEOUT
            # Wait until the mapped tasks have finished and their updates wait in the held group.
            while time.monotonic() < deadline:
                held = list(markers.iterdir())
                running = [
                    ti for ti in deployment.task_instances("fanout", run_id) if ti["task_id"] == "work"
                ]
                if len(held) >= 2 and len(running) == N:
                    break
                time.sleep(0.25)
            assert len(list(markers.iterdir())) >= 2, "no group of the mapped tasks was held"

            # Only the scheduler dies: its workers and the task supervisors live on, as in a crash of
            # the scheduler process alone, and must send their pending updates themselves.
            old_socket = re.search(r"DAG-run batching is on: .*?socket=(\S+)", _scheduler_log(deployment))
            assert old_socket is not None
            deployment.kill("scheduler", whole_group=False)
            _end_dead_scheduler_sessions(deployment)
            deployment.start("scheduler")

            assert deployment.wait_for_run("fanout", run_id, timeout=RUN_TIMEOUT) == "success"
            # A second try is allowed: if the old scheduler's last heartbeat is old enough when the new
            # one starts, Airflow resets task instances the dead scheduler had queued, as it does for
            # LocalExecutor. Each task instance must still have exactly one success.
            _assert_run_complete(deployment, run_id, first_try=False)
            assert api.state_patches() >= 1
            # The new scheduler removed the killed one's socket folder when it started.
            assert not Path(old_socket.group(1)).parent.exists()

    def test_cleared_while_waiting_is_conflict(self, tmp_path: Path):
        markers = tmp_path / "held"
        markers.mkdir()
        with _deployment(
            f"{TEST_EXECUTORS}.SlowApplyExecutor", **{MARKER_DIR_ENV: str(markers), HOLD_SECONDS_ENV: "8"}
        ) as deployment:
            run_id = deployment.trigger("fanout", conf={"n": 4})
            deadline = time.monotonic() + RUN_TIMEOUT
            # work[0] logs "Pushing xcom" just before it reports success, with its return value
            # folded into that update. The second delayed group (the first is the items task's)
            # keeps the mapped tasks' updates waiting.
            task_logs = deployment.home / "logs" / "dag_id=fanout" / f"run_id={run_id}" / "task_id=work"
            while time.monotonic() < deadline:
                pushed = [
                    path
                    for path in task_logs.glob("map_index=0/attempt=1*.log")
                    if "Pushing xcom" in path.read_text(errors="replace")
                ]
                if pushed and len(list(markers.iterdir())) >= 2:
                    break
                time.sleep(0.1)
            [before] = [
                ti
                for ti in deployment.task_instances("fanout", run_id)
                if ti["task_id"] == "work" and ti["map_index"] == 0
            ]
            assert before["state"] == "running"

            response = requests.post(
                f"{deployment.base_url}/api/v2/dags/fanout/clearTaskInstances",
                json={
                    "dry_run": False,
                    "dag_run_id": run_id,
                    "task_ids": [["work", 0]],
                    "only_failed": False,
                },
                timeout=30,
            )
            assert response.status_code == 200, response.text

            assert deployment.wait_for_run("fanout", run_id, timeout=RUN_TIMEOUT) == "success"
            [after] = [
                ti
                for ti in deployment.task_instances("fanout", run_id)
                if ti["task_id"] == "work" and ti["map_index"] == 0
            ]
            assert after["state"] == "success"
            assert after["try_number"] == 2
            logged = deployment.sql(
                "SELECT try_number FROM log WHERE dag_id = 'fanout' AND run_id = %s AND task_id = 'work' "
                "AND map_index = 0 AND event = 'success'",
                (run_id,),
            )
            # The held try-1 success was not written over the cleared task instance.
            assert [row["try_number"] for row in logged] == [2]
            # Try 2 stored its own return value; the fan-in read every value once.
            _assert_run_complete(deployment, run_id, n=4, first_try=False)
            conflicts = [
                line
                for line in _scheduler_log(deployment).splitlines()
                if "Success update not applied" in line and str(before["id"]) in line
            ]
            assert conflicts

    def test_untested_version_runs_as_local_executor(self):
        with _deployment(f"{TEST_EXECUTORS}.FutureAirflowExecutor") as deployment:
            api = ApiLog(deployment)
            run_id = deployment.trigger("fanout", conf={"n": N})

            assert deployment.wait_for_run("fanout", run_id, timeout=RUN_TIMEOUT) == "success"
            _assert_run_complete(deployment, run_id)
            assert api.state_patches() == _task_count()
            log_text = _scheduler_log(deployment)
            assert log_text.count("DAG-run batching is off: Airflow 3.4.0 is not in a tested series") == 1
            assert "DAG-run batching is on" not in log_text
