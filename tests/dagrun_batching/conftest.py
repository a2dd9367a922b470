"""Fixtures for end-to-end tests that run a real Airflow deployment on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest

from tests.support.airflow_deployment import SCENARIO_DAGS, AirflowDeployment, admin_dsn


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """Return the admin DSN of the PostgreSQL server, failing (never skipping) when it is down."""
    dsn = admin_dsn()
    try:
        psycopg2.connect(dsn, connect_timeout=5).close()
    except psycopg2.OperationalError as err:
        pytest.fail(
            f"PostgreSQL is not reachable at {dsn!r}: {err}; start it or set KESTRA_PERF_PG_HOST/PORT"
        )
    return dsn


@pytest.fixture(scope="module")
def stock_deployment(postgres_server: str) -> Iterator[AirflowDeployment]:
    """Run one stock LocalExecutor deployment of the scenario DAGs for the whole module."""
    with AirflowDeployment(executor="LocalExecutor", dags_folder=SCENARIO_DAGS, parallelism=8) as deployment:
        yield deployment
