"""Run a real Airflow 3.3 deployment on PostgreSQL for end-to-end tests and benchmarks.

:class:`AirflowDeployment` creates a fresh database and ``AIRFLOW_HOME``, runs
``airflow db migrate``, starts ``airflow api-server``, ``airflow scheduler`` and
``airflow dag-processor`` on 127.0.0.1, waits until the DAGs of ``dags_folder`` are
parsed and unpaused, and at exit stops exactly the processes it started and drops
the database::

    with AirflowDeployment(executor="LocalExecutor", dags_folder=SCENARIO_DAGS) as deployment:
        with deployment.measure() as measurement:
            run_id = deployment.trigger("fanout", conf={"n": 20})
            state = deployment.wait_for_run("fanout", run_id, timeout=300)
        print(measurement.figures.summary())

Each component connects to PostgreSQL as its own login role (``<db>_api_server``,
``<db>_scheduler``, ``<db>_dag_processor``) and with its own ``PGAPPNAME``, so
every statistic, log line and lock wait names the component. The roles are members
of ``<db>_owner``, which owns the database and its tables. The harness itself queries
as that owner, so its own polling is never counted as a component's work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import psutil
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import requests

from tests.support import pg_instruments

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIO_DAGS = Path(__file__).resolve().parent / "scenario_dags"
IDLE_WRITES_KEY = "writes"
"""Key of the server-wide rate of writing transactions in :meth:`AirflowDeployment.measure_idle`."""

PG_HOST = os.environ.get("KESTRA_PERF_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("KESTRA_PERF_PG_PORT", "5432"))
PG_ADMIN_USER = os.environ.get("KESTRA_PERF_PG_USER", "postgres")
"""Superuser the harness creates databases and roles with (trust authentication assumed)."""

DATABASE_PREFIX = "afh_"
"""Prefix of every database and role the harness creates, so leftovers are easy to find."""


COMPONENTS: dict[str, tuple[str, str]] = {
    "api_server": ("api-server", "af_api_server"),
    "scheduler": ("scheduler", "af_scheduler"),
    "dag_processor": ("dag-processor", "af_dag_processor"),
}
"""Airflow CLI command and ``PGAPPNAME`` of each component, in start order."""

TERMINAL_RUN_STATES = frozenset({"success", "failed"})


class DeploymentError(RuntimeError):
    """A deployment failed to start, lost a component or timed out."""


def _ephemeral_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default lower bound.


def free_port() -> int:
    """
    Return a TCP port on 127.0.0.1 that was free a moment ago, below the ephemeral range.

    A port the kernel hands out for binding to port 0 comes from the ephemeral range, which every
    outgoing connection also draws from, so one may take it before the component listens on it.
    """
    upper = _ephemeral_port_start()
    for _ in range(200):
        port = random.randrange(20000, upper)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise DeploymentError(f"no free TCP port on 127.0.0.1 between 20000 and {upper}")


def admin_dsn(dbname: str = "postgres", user: str = PG_ADMIN_USER) -> str:
    """Return a libpq DSN for ``dbname`` on the harness's PostgreSQL server."""
    return f"host={PG_HOST} port={PG_PORT} user={user} dbname={dbname}"


# --- figures --------------------------------------------------------------------------------


@dataclasses.dataclass
class RunTiming:
    """Timestamps of one measured DAG run, from the ``dag_run`` table."""

    dag_id: str
    run_id: str
    state: str
    queued_at: datetime.datetime | None
    start_date: datetime.datetime | None
    end_date: datetime.datetime | None


@dataclasses.dataclass
class Figures:
    """What one measured window cost the deployment.

    Per-task figures divide by :attr:`mapped_task_instances`, the mapped task instances
    (``map_index >= 0``) of the DAG runs triggered inside the window, because the mapped
    fan-out is the work being compared. The work of the few unmapped tasks is included.
    """

    wall_s: float
    """Seconds from the first trigger in the window to the end of the last wait."""
    trigger_to_end_s: float | None
    """Seconds from the earliest ``queued_at`` to the latest ``end_date`` of the measured runs."""
    start_to_end_s: float | None
    """Seconds from the earliest ``start_date`` to the latest ``end_date`` of the measured runs."""
    runs: list[RunTiming]
    task_instances: int
    mapped_task_instances: int
    statements: dict[str, pg_instruments.StatementCounts]
    """``pg_stat_statements`` counts by component (``api_server``, ``scheduler``, ``dag_processor``, ``harness``)."""
    idle_transactions_per_s: dict[str, float]
    """Transactions per second by component in an idle window before the runs, if one was measured."""
    window_s: float
    """Seconds the database counters were open, for subtracting the idle rate."""
    database: dict[str, int]
    """``pg_stat_database`` deltas (``xact_commit``, ``xact_rollback``, ``deadlocks``), which can lag the window."""
    write_transactions: int
    """Transactions that wrote, server-wide (every component and database), from the transaction-id counter."""
    statement_evictions: int
    """Server-wide ``pg_stat_statements`` evictions in the window. Above zero, the counts may be too low."""
    sampled_lock_waits: list[pg_instruments.SampledLockWait]
    logged_lock_waits: list[pg_instruments.LoggedLockWait] | None
    """``None`` when the server log could not be read."""
    api_requests: dict[str, int]
    """api-server requests by ``METHOD /route``."""
    cpu_s: dict[str, float]
    """CPU seconds (user + system) by component, as :meth:`AirflowDeployment.cpu_delta` splits them."""

    @property
    def deadlocks(self) -> int:
        """Deadlocks PostgreSQL detected in the measured database."""
        return self.database.get("deadlocks", 0)

    def per_task(self, value: float) -> float:
        """Divide ``value`` by the number of mapped task instances (or all, if none is mapped)."""
        count = self.mapped_task_instances or self.task_instances
        return value / count if count else float("nan")

    def transactions(self, component: str, *, net_of_idle: bool = False) -> float:
        """Transactions (COMMIT plus ROLLBACK) of ``component``, optionally minus its idle rate."""
        counts = self.statements.get(component)
        total = float(counts.transactions) if counts else 0.0
        if net_of_idle:
            total -= self.idle_transactions_per_s.get(component, 0.0) * self.window_s
        return total

    def writes(self, *, net_of_idle: bool = False) -> float:
        """Writing transactions in the window, optionally minus the idle rate of writes."""
        total = float(self.write_transactions)
        if net_of_idle:
            total -= self.idle_transactions_per_s.get(IDLE_WRITES_KEY, 0.0) * self.window_s
        return total

    def lock_wait_summary(self) -> dict[str, Any]:
        """Count and total of lock waits of 1 ms or more, preferring the exact log figures."""
        if self.logged_lock_waits is not None:
            waits = self.logged_lock_waits
            total_ms = sum(wait.wait_ms or 0.0 for wait in waits)
            source = "log"
        else:
            waits = [wait for wait in self.sampled_lock_waits if wait.observed_ms >= 1.0]
            total_ms = sum(wait.observed_ms for wait in waits)
            source = "sampler"
        api_on_api = sum(
            1 for wait in waits if wait.waiter == "api_server" and wait.blockers[:1] == ("api_server",)
        )
        return {
            "source": source,
            "count": len(waits),
            "total_ms": total_ms,
            "api_on_api": api_on_api,
            "pairs": pg_instruments.count_waits_by_pair(waits),
        }

    def summary(self) -> dict[str, Any]:
        """Flatten the headline figures into one JSON-serialisable dict."""
        per = self.per_task
        waits = self.lock_wait_summary()
        return {
            "trigger_to_end_s": self.trigger_to_end_s,
            "wall_s": self.wall_s,
            "task_instances": self.task_instances,
            "mapped_task_instances": self.mapped_task_instances,
            "api_server_tx_per_ti": per(self.transactions("api_server")),
            "scheduler_tx_per_ti": per(self.transactions("scheduler")),
            "scheduler_tx_per_ti_net": per(self.transactions("scheduler", net_of_idle=True)),
            "dag_processor_tx_per_ti": per(self.transactions("dag_processor")),
            "write_tx_per_ti": per(self.writes()),
            "write_tx_per_ti_net": per(self.writes(net_of_idle=True)),
            "statements_per_ti": {
                component: per(counts.statements + counts.transactions + counts.begins)
                for component, counts in self.statements.items()
            },
            "lock_waits": waits["count"],
            "lock_wait_ms": waits["total_ms"],
            "lock_waits_api_on_api": waits["api_on_api"],
            "lock_wait_source": waits["source"],
            "lock_wait_pairs": waits["pairs"],
            "sampled_lock_waits": len(self.sampled_lock_waits),
            "deadlocks": self.deadlocks,
            "api_requests_per_ti": {route: per(count) for route, count in sorted(self.api_requests.items())},
            "cpu_s": self.cpu_s,
            "statement_evictions": self.statement_evictions,
        }


class Measurement:
    """A measuring window opened by :meth:`AirflowDeployment.measure`.

    DAG runs triggered through the deployment while the window is open are the runs it
    measures; :attr:`figures` is filled when the window closes.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []
        self.first_trigger: float | None = None
        self.last_wait_end: float | None = None
        self.figures: Figures | None = None


# --- api-server access log ------------------------------------------------------------------

_ACCESS_LINE = re.compile(r"request finished.*?\bmethod=(?P<method>[A-Z]+)\b.*?\bpath=(?P<path>\S+)")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
# Execution API resources whose path carries this many identifiers after the resource name.
_EXECUTION_ID_SEGMENTS = {"xcoms": 4, "variables": 1, "connections": 1, "dags": 1}
# Core API segments followed by an identifier.
_CORE_ID_AFTER = {"dags", "dagRuns", "taskInstances", "xcomEntries", "importErrors", "assets"}


def normalise_route(method: str, path: str) -> str:
    """Return ``METHOD /route`` with identifiers replaced by placeholders."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "execution":
        resource = parts[1]
        rest = parts[2:]
        if resource == "dag-runs" and rest and rest[0] not in {"count", "previous"}:
            rest = ["{dag_id}", "{run_id}", *rest[2:]][: max(len(rest), 2)]
        elif resource in _EXECUTION_ID_SEGMENTS:
            count = _EXECUTION_ID_SEGMENTS[resource]
            rest = ["{id}"] * min(count, len(rest)) + rest[count:]
        parts = ["execution", resource, *rest]
    else:
        parts = [
            "{id}" if index and parts[index - 1] in _CORE_ID_AFTER else part
            for index, part in enumerate(parts)
        ]
    parts = ["{id}" if _UUID.match(part) or part.isdigit() else part for part in parts]
    return f"{method} /" + "/".join(parts)


def count_api_requests(path: Path, offset: int) -> dict[str, int]:
    """Count the api-server requests logged after ``offset`` by normalised route."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode("utf-8", errors="replace")
    routes: Counter[str] = Counter()
    for line in text.splitlines():
        match = _ACCESS_LINE.search(line)
        if match:
            routes[normalise_route(match.group("method"), match.group("path"))] += 1
    return dict(routes)


# --- the deployment -------------------------------------------------------------------------


@dataclasses.dataclass
class _Component:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    create_time: float


class AirflowDeployment:
    """A real Airflow deployment: fresh database, fresh ``AIRFLOW_HOME``, three processes.

    :param executor: value of ``[core] executor``, for example ``LocalExecutor`` or
        ``kestra_perf_provider.executors.BatchingLocalExecutor``.
    :param dags_folder: folder the dag-processor parses.
    :param extra_env: environment added last, overriding the harness's settings.
    :param parallelism: ``[core] parallelism``.
    :param keep: keep the database, roles and ``AIRFLOW_HOME`` after exit, for debugging.
    :param start_timeout: seconds to wait for health and for every DAG file to be parsed.
    :param stop_grace: seconds between SIGTERM and SIGKILL when stopping a component.
    :param log_lock_waits: set ``log_lock_waits`` and ``deadlock_timeout = 1ms`` on the
        deployment's database, so each wait of 1 ms or more reaches the server log.
    """

    def __init__(
        self,
        executor: str = "LocalExecutor",
        dags_folder: str | os.PathLike[str] = SCENARIO_DAGS,
        extra_env: Mapping[str, str] | None = None,
        parallelism: int = 32,
        *,
        keep: bool = False,
        start_timeout: float = 180.0,
        stop_grace: float = 15.0,
        log_lock_waits: bool = True,
    ) -> None:
        self.executor = executor
        self.dags_folder = Path(dags_folder).resolve()
        if not self.dags_folder.is_dir():
            raise ValueError(f"dags_folder {str(self.dags_folder)!r} is not a directory")
        self.extra_env = dict(extra_env or {})
        self.parallelism = parallelism
        self.keep = keep
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.log_lock_waits = log_lock_waits

        self.deployment_id = secrets.token_hex(4)
        self.dbname = f"{DATABASE_PREFIX}{time.strftime('%m%d%H%M%S')}_{self.deployment_id}"
        self.probe_dbname = f"{self.dbname}_probe"
        self.owner_role = f"{self.dbname}_owner"
        self.roles: dict[str, str] = {f"{self.dbname}_{name}": name for name in COMPONENTS}
        self.roles[self.owner_role] = "harness"
        self.port = 0
        self.home: Path | None = None
        self.dbid = 0
        self.components: dict[str, _Component] = {}
        self.started_pids: dict[int, float] = {}
        """Every process the deployment started or saw in its process trees, pid to create time."""
        self.sessions: list[int] = []
        """Session ids of every component process started, restarts and killed ones included.

        Each component starts a session of its own. Task processes leave its process group
        (the task supervisor calls ``setpgid``) but stay in its session, and processes that
        ``setproctitle`` renames lose a readable environment, so the session is what
        identifies every process a deployment started.
        """
        self.pg_log_path = pg_instruments.server_log_path()

        self._conn: psycopg2.extensions.connection | None = None
        self._probe: psycopg2.extensions.connection | None = None
        self._http = requests.Session()
        self._http.trust_env = False  # loopback only, never through a proxy
        self._env: dict[str, str] = {}
        self._measurement: Measurement | None = None
        self._database_created = False

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.setup()
        except BaseException:
            self.teardown(failed=True)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.teardown(failed=exc_type is not None)

    @property
    def base_url(self) -> str:
        """Base URL of the api-server."""
        return f"http://127.0.0.1:{self.port}"

    def setup(self) -> None:
        """Create the database and home, migrate, start every component and wait until ready."""
        self._create_database()
        self.home = Path(tempfile.mkdtemp(prefix=f"{self.dbname}-"))
        self.port = free_port()
        self._env = self._base_env()
        self._migrate()
        for name in COMPONENTS:
            self.start(name)
        self._wait_until_ready()

    def teardown(self, *, failed: bool = False) -> None:
        """Stop every process the deployment started and drop what it created.

        On failure ``AIRFLOW_HOME`` (with the component logs) is kept and its path logged.
        """
        try:
            for name in reversed(list(self.components)):
                self.stop(name)
            self._kill_sessions()
        finally:
            self._http.close()
            for conn in (self._conn, self._probe):
                if conn is not None:
                    conn.close()
            self._conn = self._probe = None
            if self._database_created and not self.keep:
                self._drop_database()
        if self.home is not None:
            if self.keep or failed:
                log.warning("kept AIRFLOW_HOME=%s database=%s", self.home, self.dbname)
            else:
                shutil.rmtree(self.home, ignore_errors=True)

    # --- database -----------------------------------------------------------------------

    def _create_database(self) -> None:
        admin = pg_instruments.connect(admin_dsn(), application_name="af_harness_admin")
        try:
            with admin.cursor() as cur:
                # Set first, so teardown drops whatever part of this block succeeded.
                self._database_created = True
                cur.execute(f'CREATE ROLE "{self.owner_role}" LOGIN')
                for role, name in self.roles.items():
                    if name != "harness":
                        cur.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE "{self.owner_role}"')
                cur.execute(f'CREATE DATABASE "{self.dbname}" OWNER "{self.owner_role}"')
                cur.execute(f'CREATE DATABASE "{self.probe_dbname}"')
                if self.log_lock_waits:
                    # Per-database settings reach only sessions of this database, so other
                    # users of the server keep their own logging.
                    cur.execute(f'ALTER DATABASE "{self.dbname}" SET log_lock_waits = on')
                    cur.execute(f"ALTER DATABASE \"{self.dbname}\" SET deadlock_timeout = '1ms'")
                cur.execute("SELECT oid FROM pg_database WHERE datname = %s", (self.dbname,))
                self.dbid = cur.fetchone()[0]
        finally:
            admin.close()
        self._probe = pg_instruments.connect(admin_dsn(self.probe_dbname), application_name="af_probe")
        with self._probe.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        log.info("created database=%s dbid=%s", self.dbname, self.dbid)

    def _drop_database(self) -> None:
        admin = pg_instruments.connect(admin_dsn(), application_name="af_harness_admin")
        try:
            with admin.cursor() as cur:
                for dbname in (self.dbname, self.probe_dbname):
                    cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
                for role in self.roles:
                    if self.roles[role] != "harness":
                        cur.execute(f'DROP ROLE IF EXISTS "{role}"')
                cur.execute(f'DROP ROLE IF EXISTS "{self.owner_role}"')
        finally:
            admin.close()
        self._database_created = False

    def _role_of(self, component: str) -> str:
        return next(role for role, name in self.roles.items() if name == component)

    def _sql_alchemy_conn(self, role: str) -> str:
        return f"postgresql+psycopg2://{role}@{PG_HOST}:{PG_PORT}/{self.dbname}"

    @property
    def connection(self) -> psycopg2.extensions.connection:
        """Autocommit connection to the deployment's database as the owner role."""
        if self._conn is None or self._conn.closed:
            self._conn = pg_instruments.connect(
                admin_dsn(self.dbname, user=self.owner_role), application_name="af_harness"
            )
        return self._conn

    @property
    def probe(self) -> psycopg2.extensions.connection:
        """Autocommit superuser connection to the probe database, where the instruments read."""
        if self._probe is None or self._probe.closed:
            self._probe = pg_instruments.connect(admin_dsn(self.probe_dbname), application_name="af_probe")
        return self._probe

    def connect(
        self, component: str = "harness", *, application_name: str = "af_harness"
    ) -> psycopg2.extensions.connection:
        """Open a new connection to the deployment's database as ``component``'s role.

        Tests use it to hold locks the way a component would; the caller closes it.
        The connection is not in autocommit mode.
        """
        conn = psycopg2.connect(
            admin_dsn(self.dbname, user=self._role_of(component)), application_name=application_name
        )
        return conn

    def sql(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        """Run ``query`` on the deployment's database and return its rows as dicts."""
        with self.connection.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(query, params)
            return [dict(row) for row in cur.fetchall()] if cur.description else []

    # --- processes ----------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
        python_path = [str(REPO_ROOT)]
        if env.get("PYTHONPATH"):
            python_path.append(env["PYTHONPATH"])
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self._sql_alchemy_conn(self.owner_role),
                "AIRFLOW__CORE__EXECUTOR": self.executor,
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "128",
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                # Every process must share these, or the api-server rejects task tokens.
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
                # The log servers default to fixed ports, which two deployments on one
                # machine would both claim.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                "NO_PROXY": "*",
                "no_proxy": "*",
                "PYTHONPATH": os.pathsep.join(python_path),
            }
        )
        env.update(self.extra_env)
        return env

    def _airflow(self) -> str:
        return str(Path(sys.executable).parent / "airflow")

    def _migrate(self) -> None:
        assert self.home is not None
        log_path = self.home / "migrate.log"
        with open(log_path, "wb") as output:
            result = subprocess.run(
                [self._airflow(), "db", "migrate"],
                env={**self._env, "PGAPPNAME": "af_migrate"},
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
            )
        if result.returncode != 0:
            raise DeploymentError(
                f"airflow db migrate failed with exit code {result.returncode}:\n{_tail(log_path)}"
            )

    def start(self, name: str) -> None:
        """Start component ``name`` (``api_server``, ``scheduler`` or ``dag_processor``).

        The process gets its own process group, its own log file (appended to on restart)
        and its own database role and ``PGAPPNAME``.
        """
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; expected one of {sorted(COMPONENTS)}")
        current = self.components.get(name)
        if current is not None and current.process.poll() is None:
            raise DeploymentError(f"component {name!r} is already running as pid {current.process.pid}")
        assert self.home is not None
        command, app_name = COMPONENTS[name]
        args = [self._airflow(), command]
        if name == "api_server":
            args += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {
            **self._env,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self._sql_alchemy_conn(self._role_of(name)),
            "PGAPPNAME": app_name,
        }
        env.update(self.extra_env)
        log_path = self.home / f"{name}.log"
        with open(log_path, "ab") as output:
            process = subprocess.Popen(
                args, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home
            )
        create_time = psutil.Process(process.pid).create_time()
        self.started_pids[process.pid] = create_time
        self.sessions.append(process.pid)
        self.components[name] = _Component(name, process, log_path, create_time)
        log.info("started component=%s pid=%s log=%s", name, process.pid, log_path)

    def kill(self, name: str, *, whole_group: bool = True) -> None:
        """SIGKILL component ``name``, as a crash would, and reap it.

        :param whole_group: kill its process group (the executor's worker processes too);
            task processes run in groups of their own and survive, as they would a crash.
        """
        component = self._component(name)
        self._remember_tree(component.process.pid)
        with contextlib.suppress(ProcessLookupError):
            if whole_group:
                os.killpg(component.process.pid, signal.SIGKILL)
            else:
                component.process.kill()
        component.process.wait(timeout=30)
        log.info("killed component=%s pid=%s", name, component.process.pid)

    def stop(self, name: str) -> None:
        """Stop component ``name``: SIGTERM to its process group, SIGKILL after the grace period."""
        component = self.components.get(name)
        if component is None:
            return
        pid = component.process.pid
        self._remember_tree(pid)
        if component.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            try:
                component.process.wait(timeout=self.stop_grace)
            except subprocess.TimeoutExpired:
                log.warning(
                    "component=%s pid=%s ignored SIGTERM for %ss; sending SIGKILL", name, pid, self.stop_grace
                )
        # Children of the group can outlive the leader, so the group is killed either way.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            component.process.wait(timeout=10)
        log.info("stopped component=%s pid=%s", name, pid)

    def _component(self, name: str) -> _Component:
        component = self.components.get(name)
        if component is None:
            raise ValueError(
                f"component {name!r} was never started; expected one of {sorted(self.components)}"
            )
        return component

    def _remember_tree(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    self.started_pids.setdefault(process.pid, process.create_time())

    def session_processes(self) -> list[psutil.Process]:
        """Return the live processes in any session the deployment started."""
        sessions = set(self.sessions)
        found = []
        for pid in psutil.pids():
            try:
                if pid != os.getpid() and os.getsid(pid) in sessions:
                    found.append(psutil.Process(pid))
            except (OSError, psutil.Error):
                continue
        return found

    def _kill_sessions(self) -> None:
        """SIGKILL whatever is left in the deployment's sessions, such as a killed component's workers."""
        leftovers = self.session_processes()
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                self.started_pids.setdefault(process.pid, process.create_time())
                log.warning(
                    "killing leftover pid=%s cmdline=%s", process.pid, " ".join(process.cmdline())[:200]
                )
                process.kill()
        psutil.wait_procs(leftovers, timeout=10)

    def alive_started_processes(self) -> list[int]:
        """Return the pids the deployment started or saw that are still alive (same create time)."""
        alive = []
        for pid, create_time in self.started_pids.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.create_time() == create_time and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def check_components(self) -> None:
        """Raise :class:`DeploymentError` naming any component that exited, with its log tail."""
        for name, component in self.components.items():
            code = component.process.poll()
            if code is not None:
                raise DeploymentError(
                    f"component {name!r} (pid {component.process.pid}) exited with code {code}; "
                    f"log {component.log_path}:\n{_tail(component.log_path)}"
                )

    # --- readiness ----------------------------------------------------------------------

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        self.wait_healthy(timeout=self.start_timeout)
        self.dag_ids = self._wait_for_dag_files(deadline)
        for dag_id in self.dag_ids:
            self._api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        log.info("deployment ready url=%s dags=%s", self.base_url, ",".join(self.dag_ids))

    def health(self) -> dict[str, Any]:
        """Return the api-server's ``/api/v2/monitor/health`` document."""
        return self._api("GET", "/api/v2/monitor/health")

    def wait_healthy(self, timeout: float = 120.0, *, after: float | None = None) -> None:
        """Wait until the database, scheduler and dag-processor report healthy.

        :param after: epoch seconds the scheduler's and dag-processor's latest heartbeat
            must be newer than, so a restarted component is seen, not its predecessor.
        :raises DeploymentError: on timeout, with the last health document.
        """
        deadline = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.check_components()
            with contextlib.suppress(requests.RequestException, DeploymentError, ValueError):
                health = self.health()
                if self._is_healthy(health, after):
                    return
            time.sleep(0.5)
        raise DeploymentError(f"deployment not healthy after {timeout}s; last health: {health}")

    @staticmethod
    def _is_healthy(health: Mapping[str, Any], after: float | None) -> bool:
        for part in ("metadatabase", "scheduler", "dag_processor"):
            status = health.get(part) or {}
            if status.get("status") != "healthy":
                return False
            heartbeat = status.get("latest_scheduler_heartbeat") or status.get(
                "latest_dag_processor_heartbeat"
            )
            if after is not None and part != "metadatabase" and not _newer_than(heartbeat, after):
                return False
        return True

    def _expected_dag_files(self) -> set[str]:
        # The dag-processor's safe mode skips files that do not mention both words.
        expected = set()
        for path in self.dags_folder.rglob("*.py"):
            text = path.read_text(errors="replace").lower()
            if "airflow" in text and "dag" in text and not path.name.startswith("_"):
                expected.add(str(path.relative_to(self.dags_folder)))
        return expected

    def _wait_for_dag_files(self, deadline: float) -> list[str]:
        expected = self._expected_dag_files()
        parsed: set[str] = set()
        while time.monotonic() < deadline:
            self.check_components()
            errors = self.sql("SELECT filename, stacktrace FROM import_error")
            if errors:
                details = "\n".join(f"{row['filename']}:\n{row['stacktrace']}" for row in errors)
                raise DeploymentError(f"DAG files in {self.dags_folder} failed to import:\n{details}")
            rows = self.sql("SELECT dag_id, relative_fileloc FROM dag WHERE is_stale IS NOT TRUE")
            parsed = {row["relative_fileloc"] for row in rows}
            if expected <= parsed:
                return sorted(row["dag_id"] for row in rows)
            time.sleep(0.5)
        raise DeploymentError(
            f"timed out after {self.start_timeout}s waiting for the dag-processor to parse "
            f"{sorted(expected - parsed)}; see {self.components['dag_processor'].log_path}"
        )

    # --- REST API -----------------------------------------------------------------------

    def _api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, f"{self.base_url}{path}", timeout=30, **kwargs)
        if response.status_code >= 400:
            raise DeploymentError(
                f"{method} {path} failed with HTTP {response.status_code}: {response.text[:500]}"
            )
        return response.json() if response.content else None

    def trigger(
        self, dag_id: str, conf: Mapping[str, Any] | None = None, *, run_id: str | None = None
    ) -> str:
        """Trigger a DAG run through the REST API and return its run id."""
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf or {})}
        if run_id is not None:
            body["dag_run_id"] = run_id
        started = time.monotonic()
        result = self._api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)
        if self._measurement is not None:
            self._measurement.runs.append((dag_id, result["dag_run_id"]))
            if self._measurement.first_trigger is None:
                self._measurement.first_trigger = started
        return result["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300.0, *, poll: float = 0.25) -> str:
        """Wait until a DAG run is ``success`` or ``failed`` and return that state.

        :raises TimeoutError: naming the run, its state and the task states when it does not end in time.
        :raises DeploymentError: when a component exits while waiting.
        """
        deadline = time.monotonic() + timeout
        state = None
        while True:
            rows = self.sql("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
            state = rows[0]["state"] if rows else None
            if state in TERMINAL_RUN_STATES:
                break
            if time.monotonic() >= deadline:
                counts = Counter(row["state"] for row in self.task_instances(dag_id, run_id))
                raise TimeoutError(
                    f"DAG run {dag_id}/{run_id} still {state!r} after {timeout}s; task states {dict(counts)}; "
                    f"logs in {self.home}"
                )
            self.check_components()
            time.sleep(poll)
        if self._measurement is not None:
            self._measurement.last_wait_end = time.monotonic()
        return state

    def wait_quiet(self, timeout: float = 300.0, *, settle: float = 2.0) -> None:
        """Wait until no DAG run is queued or running, then ``settle`` seconds more.

        Benchmarks call it between windows, so runs created by asset events of one window
        (the consumer DAGs) do not land in the next.
        """
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while True:
            rows = self.sql("SELECT dag_id, run_id, state FROM dag_run WHERE state IN ('queued', 'running')")
            now = time.monotonic()
            if rows:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= settle:
                return
            if now >= deadline:
                raise TimeoutError(f"DAG runs still active after {timeout}s: {rows[:10]}")
            self.check_components()
            time.sleep(0.5)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Return the task instances of a DAG run ordered by task_id and map_index."""
        return self.sql(
            """
            SELECT task_id, map_index, state, try_number, start_date, end_date, id
            FROM task_instance WHERE dag_id = %s AND run_id = %s ORDER BY task_id, map_index
            """,
            (dag_id, run_id),
        )

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, *, key: str = "return_value", map_index: int = -1
    ) -> Any:
        """Return the XCom value a task instance pushed, or ``None`` if there is none."""
        rows = self.sql(
            """
            SELECT value FROM xcom
            WHERE dag_id = %s AND run_id = %s AND task_id = %s AND key = %s AND map_index = %s
            """,
            (dag_id, run_id, task_id, key, map_index),
        )
        if not rows:
            return None
        value = rows[0]["value"]
        return json.loads(value) if isinstance(value, (str, bytes)) else value

    # --- measuring ----------------------------------------------------------------------

    def cpu_snapshot(self) -> dict[int, tuple[str, int, float, float]]:
        """Return ``pid -> (component, depth, own CPU s, reaped children's CPU s)`` for every process tree.

        Depth 0 is the component's main process, 1 its children (the LocalExecutor's
        worker processes, which supervise tasks), 2 and more their children (task processes).
        """
        snapshot: dict[int, tuple[str, int, float, float]] = {}
        for name, component in self.components.items():
            if component.process.poll() is not None:
                continue
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(component.process.pid)
                self._cpu_walk(name, root, 0, snapshot)
        return snapshot

    def _cpu_walk(self, name: str, process: psutil.Process, depth: int, out: dict[int, Any]) -> None:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            out[process.pid] = (
                name,
                depth,
                times.user + times.system,
                times.children_user + times.children_system,
            )
            self.started_pids.setdefault(process.pid, process.create_time())
            for child in process.children():
                self._cpu_walk(name, child, depth + 1, out)

    @staticmethod
    def cpu_delta(
        before: Mapping[int, tuple[str, int, float, float]],
        after: Mapping[int, tuple[str, int, float, float]],
    ) -> dict[str, float]:
        """Return CPU seconds spent between two snapshots by component and role.

        Keys: ``api_server``, ``dag_processor``, ``scheduler`` (main process),
        ``executor_workers`` (its children) and ``task_processes`` (their children, live or
        reaped). A process that exits and is reaped inside the window moves its whole
        lifetime's CPU into its parent's children figure.
        """
        totals: Counter[str] = Counter()
        for pid, (name, depth, own, reaped) in after.items():
            own0, reaped0 = (before[pid][2], before[pid][3]) if pid in before else (0.0, 0.0)
            own_delta, reaped_delta = own - own0, reaped - reaped0
            if name != "scheduler":
                totals[name] += own_delta + reaped_delta
                continue
            own_bucket = ("scheduler", "executor_workers", "task_processes")[min(depth, 2)]
            reaped_bucket = ("executor_workers", "task_processes", "task_processes")[min(depth, 2)]
            totals[own_bucket] += own_delta
            totals[reaped_bucket] += reaped_delta
        return {key: round(value, 3) for key, value in totals.items()}

    def _statement_window(self) -> tuple[int, float]:
        pg_instruments.reset_statements(self.probe, self.dbid)
        return pg_instruments.statement_evictions(self.probe), time.monotonic()

    def measure_idle(self, seconds: float) -> dict[str, float]:
        """
        Return transactions per second by component while nothing runs, over ``seconds``.

        The rate of writing transactions, server-wide, is under :data:`IDLE_WRITES_KEY`.
        """
        self._statement_window()
        writes_before = pg_instruments.write_transaction_counter(self.probe)
        started = time.monotonic()
        time.sleep(seconds)
        counts = pg_instruments.read_statements(self.probe, self.dbid, self.roles)
        writes = pg_instruments.write_transaction_counter(self.probe) - writes_before
        elapsed = time.monotonic() - started
        rates = {component: entry.transactions / elapsed for component, entry in counts.items()}
        rates[IDLE_WRITES_KEY] = writes / elapsed
        return rates

    @contextlib.contextmanager
    def measure(
        self,
        *,
        idle_seconds: float = 0.0,
        idle_rates: Mapping[str, float] | None = None,
        sample_interval: float = 0.05,
    ) -> Iterator[Measurement]:
        """Measure the DAG runs triggered inside the ``with`` block; figures land on ``.figures``.

        :param idle_seconds: first measure an idle window this long, so the scheduler's and
            dag-processor's loop transactions can be subtracted (``net_of_idle``).
        :param idle_rates: idle transactions per second by component from an earlier
            :meth:`measure_idle`, used when ``idle_seconds`` is 0.
        :param sample_interval: seconds between lock-wait samples.
        """
        if self._measurement is not None:
            raise DeploymentError("measure() windows cannot nest; close the open one first")
        idle = self.measure_idle(idle_seconds) if idle_seconds > 0 else dict(idle_rates or {})
        measurement = Measurement()
        database_before = pg_instruments.read_database_stats(self.probe, self.dbname)
        writes_before = pg_instruments.write_transaction_counter(self.probe)
        pg_log_offset = self._pg_log_offset()
        api_log = self.components["api_server"].log_path
        api_offset = api_log.stat().st_size
        cpu_before = self.cpu_snapshot()
        evictions_before, window_start = self._statement_window()
        sampler = pg_instruments.LockWaitSampler(
            admin_dsn(self.probe_dbname), self.dbname, self.roles, interval=sample_interval
        ).start()
        roster = pg_instruments.BackendRoster(admin_dsn(self.probe_dbname), self.dbname).start()
        self._measurement = measurement
        try:
            yield measurement
        finally:
            self._measurement = None
            sampled = sampler.stop()
            pid_roles = roster.stop()
        window_s = time.monotonic() - window_start
        statements = pg_instruments.read_statements(self.probe, self.dbid, self.roles)
        evictions = pg_instruments.statement_evictions(self.probe) - evictions_before
        cpu = self.cpu_delta(cpu_before, self.cpu_snapshot())
        sampler.resolve_tables(self.connection)
        database_after = pg_instruments.read_database_stats(self.probe, self.dbname)
        writes = pg_instruments.write_transaction_counter(self.probe) - writes_before
        logged = None
        if pg_log_offset is not None:
            pid_roles.update(pg_instruments.pid_roles_of(self.probe, self.dbname))
            logged = pg_instruments.read_logged_lock_waits(
                self.pg_log_path, pg_log_offset, self.dbname, self.roles, pid_roles
            )
        runs = [self._run_timing(dag_id, run_id) for dag_id, run_id in measurement.runs]
        task_counts = self._task_counts(measurement.runs)
        measurement.figures = Figures(
            wall_s=_elapsed(measurement.first_trigger, measurement.last_wait_end),
            trigger_to_end_s=_span(runs, "queued_at"),
            start_to_end_s=_span(runs, "start_date"),
            runs=runs,
            task_instances=task_counts[0],
            mapped_task_instances=task_counts[1],
            statements=statements,
            idle_transactions_per_s=idle,
            window_s=window_s,
            database={key: database_after[key] - database_before[key] for key in database_after},
            write_transactions=writes,
            statement_evictions=evictions,
            sampled_lock_waits=sampled,
            logged_lock_waits=logged,
            api_requests=count_api_requests(api_log, api_offset),
            cpu_s=cpu,
        )

    def _pg_log_offset(self) -> int | None:
        if not self.log_lock_waits:
            return None
        try:
            return pg_instruments.log_size(self.pg_log_path)
        except OSError as err:
            log.warning(
                "cannot read PostgreSQL log %s (%s); lock waits come from sampling only",
                self.pg_log_path,
                err,
            )
            return None

    def _run_timing(self, dag_id: str, run_id: str) -> RunTiming:
        rows = self.sql(
            "SELECT state, queued_at, start_date, end_date FROM dag_run WHERE dag_id = %s AND run_id = %s",
            (dag_id, run_id),
        )
        if not rows:
            raise DeploymentError(f"DAG run {dag_id}/{run_id} not found in the dag_run table")
        return RunTiming(dag_id=dag_id, run_id=run_id, **rows[0])

    def _task_counts(self, runs: list[tuple[str, str]]) -> tuple[int, int]:
        total = mapped = 0
        for dag_id, run_id in runs:
            rows = self.sql(
                "SELECT count(*) AS total, count(*) FILTER (WHERE map_index >= 0) AS mapped "
                "FROM task_instance WHERE dag_id = %s AND run_id = %s",
                (dag_id, run_id),
            )
            total += rows[0]["total"]
            mapped += rows[0]["mapped"]
        return total, mapped


def _newer_than(timestamp: str | None, epoch: float) -> bool:
    return timestamp is not None and datetime.datetime.fromisoformat(timestamp).timestamp() > epoch


def _elapsed(start: float | None, end: float | None) -> float:
    return end - start if start is not None and end is not None else float("nan")


def _span(runs: list[RunTiming], start_field: str) -> float | None:
    starts = [getattr(run, start_field) for run in runs if getattr(run, start_field) is not None]
    ends = [run.end_date for run in runs if run.end_date is not None]
    if not starts or len(ends) != len(runs):
        return None
    return (max(ends) - min(starts)).total_seconds()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(cannot read {path}: {err})"
