"""
DAGs whose rows the applier tests build by hand: plain tasks, tasks with an asset outlet, and the
asset-scheduled consumer that makes those tasks write ``asset_dag_run_queue`` rows.
"""

from __future__ import annotations

import datetime

from airflow.sdk import DAG, Asset, task

BATCHING_ASSET = Asset(name="batching_apply_asset", uri="file:///tmp/batching_apply_asset")

with DAG(
    dag_id="batching_apply",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    catchup=False,
):
    for index in range(6):

        @task(task_id=f"plain_{index}")
        def plain() -> None:
            pass

        plain()

    for index in range(3):

        @task(task_id=f"produce_{index}", outlets=[BATCHING_ASSET])
        def produce() -> None:
            pass

        produce()

with DAG(
    dag_id="batching_apply_consumer",
    schedule=[BATCHING_ASSET],
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    catchup=False,
):

    @task
    def consume() -> None:
        pass

    consume()
