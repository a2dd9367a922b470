"""Test-session setup shared by every test package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Airflow reads AIRFLOW_HOME when it is first imported, so this runs before any test module imports
# it: the suite never touches ~/airflow, and a SQLite metadata database is made per session.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="kestra-perf-tests-airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(AIRFLOW_HOME / "dags")
os.environ.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
# The host-wide budget and cache of this session stay apart from other Airflow processes on the host.
os.environ["AIRFLOW__NAMESPACE_FILES__BUDGET_DIR"] = str(AIRFLOW_HOME / "namespace-files-budget")
os.environ["AIRFLOW__NAMESPACE_FILES__CACHE_DIR"] = str(AIRFLOW_HOME / "namespace-files-cache")

REPO_ROOT = Path(__file__).resolve().parent.parent
# Per-try working folders of operator tests stay inside the session folder too.
os.environ["AIRFLOW__NAMESPACE_FILES__WORKING_DIR_ROOT"] = str(AIRFLOW_HOME / "namespace-files-work")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's Airflow home, with its SQLite database, budget and cache."""
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrate the session's SQLite metadata database once, for tests that run DAGs in-process."""
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    assert result.returncode == 0, f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return AIRFLOW_HOME
