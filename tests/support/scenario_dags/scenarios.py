"""Scenario DAGs for measuring task-state updates on a real Airflow deployment.

Each DAG maps one task over ``n`` items. ``n`` comes from the DAG run's conf, for
example ``{"n": 100}``, and defaults to 10, so one parsed DAG serves every size:

* ``fanout``: the mapped task returns a small value; ``fan_in`` reads every result and
  fails if one is missing, duplicated or wrong.
* ``barrier``: each mapped task sleeps until the next multiple of ``barrier_period``
  seconds of wall-clock time (conf, default 4), after ``barrier_at`` (conf, epoch
  seconds) if given, so the tasks running at once finish at the same moment.
* ``outlets`` and ``outlets_barrier``: as ``fanout`` and ``barrier``, with an asset
  outlet on the mapped task; ``outlets_consumer`` and ``outlets_barrier_consumer`` are
  scheduled on those assets.
* ``retries``: every mapped task fails on try 1 and succeeds on try 2 (retry delay 1 s).
* ``fail_fast``: a ``fail_fast=True`` DAG whose mapped task ``work`` fails at item
  ``fail_index`` (conf, default ``n - 1``, after ``fail_delay`` seconds, default 2)
  while a second mapped task ``slow`` (``slow_n`` items, default 2) sleeps
  ``slow_seconds`` (default 60), so fail-fast has running tasks to stop.
"""

from __future__ import annotations

import datetime
import math
import time

from airflow.sdk import Asset, dag, get_current_context, task

DEFAULT_N = 10
RETRY_DELAY = datetime.timedelta(seconds=1)

OUTLETS_ASSET = Asset(name="scenario_outlets", uri="file:///scenario/outlets")
OUTLETS_BARRIER_ASSET = Asset(name="scenario_outlets_barrier", uri="file:///scenario/outlets_barrier")

DAG_DEFAULTS = {"schedule": None, "start_date": datetime.datetime(2024, 1, 1), "catchup": False}


def expected_value(item: int) -> int:
    """Return what the mapped task returns for ``item``; ``fan_in`` checks against it."""
    return item * 3 + 1


def _conf() -> dict:
    dag_run = get_current_context()["dag_run"]
    return dict(dag_run.conf or {})


def _sleep_until_barrier() -> None:
    conf = _conf()
    period = float(conf.get("barrier_period", 4.0))
    now = time.time()
    target = max(now, float(conf.get("barrier_at", 0.0)))
    target = math.ceil(target / period) * period
    time.sleep(max(0.0, target - time.time()))


@task
def items() -> list[int]:
    """Return the items to map over: ``range(n)``."""
    return list(range(int(_conf().get("n", DEFAULT_N))))


@task
def fan_in(results) -> dict:
    """Check that every mapped result arrived once and is right; return their count and sum."""
    n = int(_conf().get("n", DEFAULT_N))
    values = list(results)
    expected = [expected_value(item) for item in range(n)]
    if len(values) != n:
        raise ValueError(f"fan_in expected {n} mapped results, got {len(values)}")
    if sorted(values) != expected:
        missing = sorted(set(expected) - set(values))
        duplicated = sorted(value for value in set(values) if values.count(value) > 1)
        raise ValueError(f"fan_in results wrong: missing {missing[:10]}, duplicated {duplicated[:10]}")
    return {"n": n, "sum": sum(values)}


@task
def work(item: int) -> int:
    """Return the small value of ``item``."""
    return expected_value(item)


@task
def work_at_barrier(item: int) -> int:
    """Wait for the shared wall-clock barrier, then return the value of ``item``."""
    _sleep_until_barrier()
    return expected_value(item)


@task(outlets=[OUTLETS_ASSET])
def work_with_outlet(item: int) -> int:
    """Return the value of ``item``; success emits an event on the outlets asset."""
    return expected_value(item)


@task(outlets=[OUTLETS_BARRIER_ASSET])
def work_with_outlet_at_barrier(item: int) -> int:
    """Wait for the barrier, then return the value of ``item`` and emit an asset event."""
    _sleep_until_barrier()
    return expected_value(item)


@task(retries=1, retry_delay=RETRY_DELAY)
def work_failing_once(item: int) -> int:
    """Fail on the first try and return the value of ``item`` on the second."""
    try_number = get_current_context()["ti"].try_number
    if try_number == 1:
        raise RuntimeError(f"item {item} fails on try 1 by design")
    return expected_value(item)


@task
def work_or_fail(item: int) -> int:
    """Return the value of ``item``, except at ``fail_index`` which fails after ``fail_delay`` s."""
    conf = _conf()
    fail_index = int(conf.get("fail_index", int(conf.get("n", DEFAULT_N)) - 1))
    if item == fail_index:
        time.sleep(float(conf.get("fail_delay", 2.0)))
        raise RuntimeError(f"item {item} fails by design to trigger fail_fast")
    return expected_value(item)


@task
def slow_items() -> list[int]:
    """Return the items of the slow mapped task: ``range(slow_n)``."""
    return list(range(int(_conf().get("slow_n", 2))))


@task
def slow(item: int) -> int:
    """Sleep ``slow_seconds`` so that fail-fast finds this task running."""
    time.sleep(float(_conf().get("slow_seconds", 60.0)))
    return item


@dag(dag_id="fanout", **DAG_DEFAULTS)
def fanout():
    fan_in(work.expand(item=items()))


@dag(dag_id="barrier", **DAG_DEFAULTS)
def barrier():
    fan_in(work_at_barrier.expand(item=items()))


@dag(dag_id="outlets", **DAG_DEFAULTS)
def outlets():
    fan_in(work_with_outlet.expand(item=items()))


@dag(dag_id="outlets_barrier", **DAG_DEFAULTS)
def outlets_barrier():
    fan_in(work_with_outlet_at_barrier.expand(item=items()))


@task
def consume() -> None:
    """Do nothing: the consumer DAG exists so asset events queue runs for it."""


@dag(
    dag_id="outlets_consumer", schedule=[OUTLETS_ASSET], start_date=DAG_DEFAULTS["start_date"], catchup=False
)
def outlets_consumer():
    consume()


@dag(
    dag_id="outlets_barrier_consumer",
    schedule=[OUTLETS_BARRIER_ASSET],
    start_date=DAG_DEFAULTS["start_date"],
    catchup=False,
)
def outlets_barrier_consumer():
    consume()


@dag(dag_id="retries", **DAG_DEFAULTS)
def retries():
    fan_in(work_failing_once.expand(item=items()))


@dag(dag_id="fail_fast", fail_fast=True, **DAG_DEFAULTS)
def fail_fast():
    fan_in(work_or_fail.expand(item=items()))
    slow.expand(item=slow_items())


fanout()
barrier()
outlets()
outlets_barrier()
outlets_consumer()
outlets_barrier_consumer()
retries()
fail_fast()
