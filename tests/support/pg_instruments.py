"""Measure what an Airflow deployment does to its PostgreSQL database.

Every figure is attributed to a component through the login role that component uses:
each deployment process connects as its own role (see
:mod:`tests.support.airflow_deployment`), and PostgreSQL keys ``pg_stat_statements``
on ``(userid, dbid, queryid)`` and writes ``%u`` in every log line. That attribution
is exact for psycopg2 and asyncpg connections alike, needs no server-wide setting,
and is unaffected by other databases on the same server because every query filters
on the deployment's ``dbid`` or ``datname``.

Sources, and why each one:

* transactions and statements: ``pg_stat_statements`` counts every ``COMMIT`` and
  ``ROLLBACK`` a client sends (``track_utility`` is on by default). SQLAlchemy with
  psycopg2 or asyncpg never runs in autocommit mode in Airflow, so each transaction
  ends with exactly one of them. ``pg_stat_database.xact_commit`` is kept only as a
  cross-check because backends flush it at most once a second and idle backends only
  after ten seconds, so it lags the end of a run.
* lock waits: the server log with ``log_lock_waits = on`` and
  ``deadlock_timeout = 1ms`` gives every wait of 1 ms or more with its exact duration.
  Both settings are made with ``ALTER DATABASE`` for the deployment's database only.
  A sampler of ``pg_locks`` joined with ``pg_stat_activity`` every 50 ms names the
  blocking backend and works where the log cannot be read.
* deadlocks: the ``pg_stat_database.deadlocks`` delta.

The sampler and all readings connect to a separate probe database, so the
instruments add nothing to the figures of the database they measure.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Self

import psycopg2
import psycopg2.extensions

log = logging.getLogger(__name__)

DEFAULT_PG_LOG = "/var/log/postgresql/postgresql-15-main.log"
"""Server log of the Debian ``postgresql-15`` cluster when ``logging_collector`` is off."""

PG_LOG_ENV = "KESTRA_PERF_PG_LOG"
"""Environment variable that overrides the path of the PostgreSQL server log."""

_TRANSACTION_END = re.compile(
    r"^\s*(commit|end|rollback|abort)\s*(transaction|work)?\s*;?\s*$", re.IGNORECASE
)
_TRANSACTION_COMMIT = re.compile(r"^\s*(commit|end)\b", re.IGNORECASE)
_TRANSACTION_BEGIN = re.compile(r"^\s*(begin|start\s+transaction)\b", re.IGNORECASE)
_TABLE_IN_QUERY = re.compile(
    r"^\s*(?:update|insert\s+into|delete\s+from|select\b.*?\bfrom)\s+\"?([a-z_][a-z0-9_]*)",
    re.IGNORECASE | re.DOTALL,
)

# Lines written with the prefix '%m [%p] %q%u@%d ' (the Debian default plus user and database).
_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[(?P<pid>\d+)\] "
    r"(?:(?P<user>[^@\s]*)@(?P<db>\S*) )?(?P<level>[A-Z]+):\s+(?P<message>.*)$"
)
_STILL_WAITING = re.compile(r"process (\d+) still waiting for (\S+) on (.+?) after ([\d.]+) ms")
_ACQUIRED = re.compile(r"process (\d+) acquired (\S+) on (.+?) after ([\d.]+) ms")
_HOLDERS = re.compile(r"Process(?:es)? holding the lock: ([\d, ]+)\.")


def connect(dsn: str, *, application_name: str) -> psycopg2.extensions.connection:
    """Open an autocommit connection named ``application_name``."""
    conn = psycopg2.connect(dsn, application_name=application_name)
    conn.autocommit = True
    return conn


def table_in_query(query: str | None) -> str | None:
    """Return the first table a DML or SELECT statement names, or ``None``."""
    if not query:
        return None
    match = _TABLE_IN_QUERY.match(query)
    return match.group(1).lower() if match else None


# --- statements and transactions ------------------------------------------------------------


@dataclasses.dataclass
class StatementCounts:
    """Calls counted by ``pg_stat_statements`` for one component."""

    transactions: int = 0
    commits: int = 0
    rollbacks: int = 0
    begins: int = 0
    statements: int = 0
    """Calls other than transaction control (BEGIN, COMMIT, ROLLBACK)."""
    top: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    """The most frequent statements as ``(calls, query)``, most frequent first."""


def reset_statements(probe: psycopg2.extensions.connection, dbid: int) -> None:
    """Reset the ``pg_stat_statements`` entries of one database and leave the others alone."""
    with probe.cursor() as cur:
        cur.execute("SELECT pg_stat_statements_reset(0, %s, 0)", (dbid,))


def statement_evictions(probe: psycopg2.extensions.connection) -> int:
    """Return the server-wide count of entries ``pg_stat_statements`` has evicted."""
    with probe.cursor() as cur:
        cur.execute("SELECT dealloc FROM pg_stat_statements_info")
        return int(cur.fetchone()[0])


def read_statements(
    probe: psycopg2.extensions.connection, dbid: int, roles: Mapping[str, str], *, top: int = 8
) -> dict[str, StatementCounts]:
    """Count the calls of each component since the last reset.

    :param dbid: oid of the measured database.
    :param roles: component name by login role name.
    :param top: how many of the most frequent statements to keep per component.
    """
    with probe.cursor() as cur:
        cur.execute(
            """
            SELECT r.rolname, s.query, s.calls
            FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
            WHERE s.dbid = %s AND s.toplevel
            """,
            (dbid,),
        )
        rows = cur.fetchall()
    counts = {component: StatementCounts() for component in roles.values()}
    for rolname, query, calls in rows:
        component = roles.get(rolname, rolname)
        entry = counts.setdefault(component, StatementCounts())
        if _TRANSACTION_END.match(query):
            entry.transactions += calls
            if _TRANSACTION_COMMIT.match(query):
                entry.commits += calls
            else:
                entry.rollbacks += calls
        elif _TRANSACTION_BEGIN.match(query):
            entry.begins += calls
        else:
            entry.statements += calls
            entry.top.append((calls, " ".join(query.split())[:160]))
    for entry in counts.values():
        entry.top = sorted(entry.top, reverse=True)[:top]
    return counts


def write_transaction_counter(probe: psycopg2.extensions.connection) -> int:
    """
    Return the server's next transaction id, which counts transactions that wrote.

    PostgreSQL assigns a transaction id only on a transaction's first write, so the difference of
    two readings is the number of writing transactions in between, in every database of the
    server. Reading the snapshot's xmax assigns none itself.
    """
    with probe.cursor() as cur:
        cur.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        return int(cur.fetchone()[0])


def read_database_stats(probe: psycopg2.extensions.connection, datname: str) -> dict[str, int]:
    """Return the cumulative ``pg_stat_database`` counters of one database."""
    with probe.cursor() as cur:
        cur.execute(
            "SELECT xact_commit, xact_rollback, deadlocks FROM pg_stat_database WHERE datname = %s",
            (datname,),
        )
        row = cur.fetchone()
    if row is None:
        raise LookupError(f"database {datname!r} not found in pg_stat_database")
    return {"xact_commit": row[0], "xact_rollback": row[1], "deadlocks": row[2]}


# --- lock waits from sampling ---------------------------------------------------------------


@dataclasses.dataclass
class SampledLockWait:
    """One lock wait seen by :class:`LockWaitSampler`."""

    waiter_pid: int
    waiter: str
    """Component of the waiting backend."""
    blockers: tuple[str, ...]
    """Components of the backends ``pg_blocking_pids`` named."""
    locktype: str
    mode: str
    table: str | None
    """Relation of a relation lock, or else the table the waiting statement names."""
    first_seen: float
    last_seen: float
    waitstart: float | None
    waiter_query: str | None
    blocker_queries: tuple[str, ...]

    @property
    def observed_ms(self) -> float:
        """Return the time from the start of the wait to the last sample that saw it (a lower bound)."""
        start = self.waitstart if self.waitstart is not None else self.first_seen
        return max(0.0, (self.last_seen - start) * 1000.0)


class LockWaitSampler:
    """Sample ungranted locks of one database from a connection to another database.

    Waits shorter than the sampling interval can be missed, and a wait's duration is
    known only up to the last sample that saw it, so the log-based figures of
    :func:`read_logged_lock_waits` are the exact ones; the sampler tells who blocked whom.

    :param probe_dsn: DSN of a database other than the measured one.
    :param datname: name of the measured database.
    :param roles: component name by login role name.
    :param interval: seconds between samples.
    """

    _QUERY = """
        SELECT extract(epoch FROM clock_timestamp()), w.pid, w.usename, l.locktype, l.mode,
               l.relation, extract(epoch FROM l.waitstart), left(w.query, 400),
               coalesce(array_agg(b.usename) FILTER (WHERE b.pid IS NOT NULL), '{}'),
               coalesce(array_agg(left(b.query, 400)) FILTER (WHERE b.pid IS NOT NULL), '{}')
        FROM pg_locks l
        JOIN pg_stat_activity w ON w.pid = l.pid
        LEFT JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid) ON true
        LEFT JOIN pg_stat_activity b ON b.pid = bp.pid
        WHERE NOT l.granted AND w.datname = %s
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    """

    def __init__(
        self, probe_dsn: str, datname: str, roles: Mapping[str, str], *, interval: float = 0.05
    ) -> None:
        self._probe_dsn = probe_dsn
        self._datname = datname
        self._roles = dict(roles)
        self._interval = interval
        self._waits: dict[tuple[Any, ...], SampledLockWait] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._relation_oids: set[int] = set()
        self.samples = 0

    def start(self) -> LockWaitSampler:
        """Start sampling in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name=f"lock-sampler-{self._datname}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[SampledLockWait]:
        """Stop sampling and return the waits seen, in order of first sighting.

        :raises RuntimeError: when the sampling thread failed, so a broken instrument
            never reports zero waits.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._error is not None:
            raise RuntimeError(f"lock-wait sampler for {self._datname!r} failed") from self._error
        return sorted(self._waits.values(), key=lambda wait: wait.first_seen)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def waits(self) -> list[SampledLockWait]:
        """Waits seen so far, in order of first sighting."""
        return sorted(self._waits.values(), key=lambda wait: wait.first_seen)

    def resolve_tables(self, measured_conn: psycopg2.extensions.connection) -> None:
        """Replace relation oids by table names, which only the measured database can resolve."""
        if not self._relation_oids:
            return
        with measured_conn.cursor() as cur:
            cur.execute("SELECT oid, relname FROM pg_class WHERE oid = ANY(%s)", (list(self._relation_oids),))
            names = {oid: relname for oid, relname in cur.fetchall()}
        for wait in self._waits.values():
            if isinstance(wait.table, int):
                wait.table = names.get(wait.table, str(wait.table))

    def _component(self, usename: str | None) -> str:
        return self._roles.get(usename or "", usename or "unknown")

    def _run(self) -> None:
        try:
            conn = connect(self._probe_dsn, application_name="af_lock_sampler")
        except BaseException as err:  # noqa: BLE001 - reported by stop()
            self._error = err
            return
        try:
            with conn.cursor() as cur:
                while not self._stop.is_set():
                    cur.execute(self._QUERY, (self._datname,))
                    self._record(cur.fetchall())
                    self.samples += 1
                    self._stop.wait(self._interval)
        except BaseException as err:  # noqa: BLE001 - reported by stop()
            self._error = err
        finally:
            conn.close()

    def _record(self, rows: Iterable[tuple[Any, ...]]) -> None:
        for now, pid, usename, locktype, mode, relation, waitstart, query, blockers, blocker_queries in rows:
            now = float(now)
            waitstart = float(waitstart) if waitstart is not None else None
            # A backend waits for one lock at a time, so the pid and the start of the wait
            # identify the wait. Until PostgreSQL fills waitstart, the lock target stands in.
            key = (pid, waitstart) if waitstart is not None else (pid, locktype, mode, relation)
            wait = self._waits.get(key)
            if wait is None and waitstart is not None:
                wait = self._waits.pop((pid, locktype, mode, relation), None)
                if wait is not None:
                    self._waits[key] = wait
            if wait is None:
                if relation is not None:
                    self._relation_oids.add(int(relation))
                wait = SampledLockWait(
                    waiter_pid=pid,
                    waiter=self._component(usename),
                    blockers=tuple(self._component(name) for name in blockers),
                    locktype=locktype,
                    mode=mode,
                    table=int(relation) if relation is not None else table_in_query(query),
                    first_seen=now,
                    last_seen=now,
                    waitstart=waitstart,
                    waiter_query=query,
                    blocker_queries=tuple(blocker_queries),
                )
                self._waits[key] = wait
            wait.last_seen = now
            wait.waitstart = waitstart if waitstart is not None else wait.waitstart
            if blockers and not wait.blockers:
                wait.blockers = tuple(self._component(name) for name in blockers)
                wait.blocker_queries = tuple(blocker_queries)


# --- lock waits from the server log ---------------------------------------------------------


@dataclasses.dataclass
class LoggedLockWait:
    """One lock wait of 1 ms or more, as ``log_lock_waits`` reported it."""

    waiter_pid: int
    waiter: str
    lock: str
    """What was waited for, for example ``transaction 1234`` or ``tuple (0,5) of relation 16400``."""
    mode: str
    holder_pids: tuple[int, ...]
    blockers: tuple[str, ...] = ()
    """Components of the holders, where the lock-wait sampler saw those backends."""
    wait_ms: float | None = None
    """Duration from the matching ``acquired`` line, or ``None`` if the wait never ended in the window."""
    table: str | None = None
    statement: str | None = None


def server_log_path() -> str:
    """Return the PostgreSQL server log path: ``$KESTRA_PERF_PG_LOG`` or the Debian default."""
    return os.environ.get(PG_LOG_ENV, DEFAULT_PG_LOG)


def log_size(path: str) -> int:
    """Return the current size of the server log, the offset a reading starts at."""
    return os.stat(path).st_size


def read_logged_lock_waits(
    path: str, offset: int, datname: str, roles: Mapping[str, str], pid_roles: Mapping[int, str]
) -> list[LoggedLockWait]:
    """Parse the lock waits of one database logged after ``offset``.

    :param path: the server log.
    :param offset: byte offset returned by :func:`log_size` at the start of the window.
    :param datname: database whose lines count; the others are skipped.
    :param roles: component name by login role name.
    :param pid_roles: login role by backend pid, for naming lock holders.
    """
    with open(path, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode("utf-8", errors="replace")

    waits: list[LoggedLockWait] = []
    open_waits: dict[int, LoggedLockWait] = {}
    last: LoggedLockWait | None = None
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None or match.group("db") != datname:
            continue
        level, message = match.group("level"), match.group("message")
        user = match.group("user") or ""
        if level == "LOG" and (waiting := _STILL_WAITING.search(message)):
            pid = int(waiting.group(1))
            last = LoggedLockWait(
                waiter_pid=pid,
                waiter=roles.get(user, user),
                lock=waiting.group(3),
                mode=waiting.group(2),
                holder_pids=(),
            )
            waits.append(last)
            open_waits[pid] = last
        elif level == "LOG" and (acquired := _ACQUIRED.search(message)):
            wait = open_waits.pop(int(acquired.group(1)), None)
            if wait is not None:
                wait.wait_ms = float(acquired.group(4))
            last = None
        elif level == "DETAIL" and last is not None and (holders := _HOLDERS.search(message)):
            last.holder_pids = tuple(int(pid) for pid in re.findall(r"\d+", holders.group(1)))
            last.blockers = tuple(
                roles.get(pid_roles.get(pid, ""), pid_roles.get(pid, "unknown")) for pid in last.holder_pids
            )
        elif level == "CONTEXT" and last is not None and last.table is None:
            relation = re.search(r'relation "([^"]+)"', message)
            last.table = relation.group(1) if relation else None
        elif level == "STATEMENT" and last is not None:
            last.statement = message[:400]
            last.table = last.table or table_in_query(message)
            last = None
    return waits


def pid_roles_of(probe: psycopg2.extensions.connection, datname: str) -> dict[int, str]:
    """Return the login role of every backend now connected to ``datname``."""
    with probe.cursor() as cur:
        cur.execute("SELECT pid, usename FROM pg_stat_activity WHERE datname = %s", (datname,))
        return {pid: usename for pid, usename in cur.fetchall()}


class BackendRoster:
    """Record the login role of every backend of a database, sampled in a thread.

    Lock-wait log lines name holders by pid only, and a holder can disconnect before the
    window ends, so the roster is recorded while the window is open.
    """

    def __init__(self, probe_dsn: str, datname: str, *, interval: float = 0.1) -> None:
        self._probe_dsn = probe_dsn
        self._datname = datname
        self._interval = interval
        self.pid_roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"roster-{datname}", daemon=True)

    def start(self) -> BackendRoster:
        """Start recording."""
        self._thread.start()
        return self

    def stop(self) -> dict[int, str]:
        """Stop recording and return the login role by backend pid."""
        self._stop.set()
        self._thread.join(timeout=10)
        return self.pid_roles

    def _run(self) -> None:
        try:
            conn = connect(self._probe_dsn, application_name="af_backend_roster")
        except psycopg2.Error:
            log.exception("backend roster could not connect to the probe database")
            return
        try:
            while not self._stop.is_set():
                self.pid_roles.update(pid_roles_of(conn, self._datname))
                self._stop.wait(self._interval)
        except psycopg2.Error:
            log.exception("backend roster stopped for datname=%s", self._datname)
        finally:
            conn.close()


def count_waits_by_pair(waits: Iterable[SampledLockWait | LoggedLockWait]) -> dict[str, int]:
    """Count waits by ``waiter->blocker`` component pair and table."""
    pairs: collections.Counter[str] = collections.Counter()
    for wait in waits:
        blocker = wait.blockers[0] if wait.blockers else "unknown"
        pairs[f"{wait.waiter}->{blocker} on {wait.table or wait_lock(wait)}"] += 1
    return dict(pairs)


def wait_lock(wait: SampledLockWait | LoggedLockWait) -> str:
    """Return the lock type of a wait, for waits whose table is unknown."""
    return wait.locktype if isinstance(wait, SampledLockWait) else wait.lock.split(" ")[0]
