"""
Example DAG: stage two namespaces shipped beside this file and run a script from them.

``shared`` contains scripts, data and a default config; ``team-a`` overrides the config and adds a
second quarter of data. ``airflow dags test namespace_files_example`` runs it on the embedded
defaults (SQLite metadata database, local files). Point the URLs at ``s3://...`` with a ``conn_id``
to stage from object storage instead.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag, task

from kestra_perf_provider.namespace_files import Namespace, NamespaceFilesMixin

NAMESPACES = Path(__file__).resolve().parent / "namespaces"
SHARED = Namespace(f"file://{NAMESPACES / 'shared'}")
TEAM_A = Namespace(f"file://{NAMESPACES / 'team-a'}")


class NamespaceFilesBashOperator(NamespaceFilesMixin, BashOperator):
    """BashOperator whose command runs in a folder holding the staged namespace files."""


@dag(
    dag_id="namespace_files_example",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "namespace_files"],
)
def namespace_files_example():
    # Later namespaces win: team-a's config/settings.json replaces the shared one.
    report = NamespaceFilesBashOperator(
        task_id="report",
        namespaces=[SHARED, TEAM_A],
        namespace_include=["scripts/**", "data/*.csv", "config/"],
        namespace_exclude=["*.tmp", "docs/"],
        bash_command="python3 scripts/report.py && test -f report.txt",
    )

    @task.namespace_files(namespaces=[SHARED, TEAM_A], namespace_include=["data/*.csv"])
    def count_sales(namespace_files_dir: str | None = None) -> int:
        files = sorted(Path(namespace_files_dir, "data").glob("*.csv"))
        rows = [row for path in files for row in csv.DictReader(path.open(newline=""))]
        if len(files) != 2 or len(rows) != 6:
            raise ValueError(f"expected 2 staged CSV files with 6 rows, found {len(files)} and {len(rows)}")
        return len(rows)

    report >> count_sales()


namespace_files_example()
