"""Staging from a real moto S3 server through s3fs: trees, parallelism, retries, failures,
several namespaces, Airflow connections and metrics.

Most tests turn botocore's own retries off (``config_kwargs={"retries": {"total_max_attempts": 1}}``)
so that an injected fault reaches s3fs at once. s3fs still makes :data:`S3FS_TRIES` tries of each
request and of each body read, so a key must fail that many times in a row before the provider's
retry layer receives the error. Unless a test is about the host cache, the cache is off, so every
staged file is one GET on the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import s3fs

from kestra_perf_provider.exceptions import NamespaceNotFoundError, StagingError, UnknownConnectionError
from kestra_perf_provider.namespace_files import Namespace, StagingResult, stage_namespace_files
from kestra_perf_provider.namespace_files.settings import NamespaceFilesSettings, load_settings
from kestra_perf_provider.namespace_files.sources import open_filesystem
from kestra_perf_provider.namespace_files.transfer import TEMP_SUFFIX

if TYPE_CHECKING:
    from tests.support.s3_server import S3Bucket, S3TestServer

#: Tries that s3fs makes of one request after a throttling error, and of one body read after a
#: dropped connection, before it raises (``S3FileSystem.retries``, 5 in s3fs 2026.9).
S3FS_TRIES: int = s3fs.S3FileSystem.retries

TREE = {
    "readme.md": b"# shared namespace\n",
    "scripts/etl/load.py": b"print('load')\n",
    "scripts/etl/deep/er/still/query.sql": b"select 1;\n",
    "data/empty.csv": b"",
    "with space/and \u00e9 \u00fc \u00df.txt": "unicode \u2713".encode(),
    "\u65e5\u672c\u8a9e/\u30d5\u30a1\u30a4\u30eb 1.txt": b"jp",
    "party \U0001f389/a+b=c&d 100%.txt": b"reserved characters",
}


def storage_options(server: S3TestServer, **extra: Any) -> dict[str, Any]:
    """Return s3fs options for the test server with botocore's retries turned off."""
    return {
        **server.storage_options(),
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
        **extra,
    }


def make_settings(
    tmp_path: Path,
    *,
    cap: int = 4,
    host: int = 32,
    max_retries: int = 2,
    cache: bool = False,
    presigned: bool = True,
) -> NamespaceFilesSettings:
    return load_settings(
        host_parallel_downloads=host,
        task_parallel_downloads=cap,
        budget_dir=tmp_path / "budget",
        max_retries=max_retries,
        cache_enabled=cache,
        cache_dir=tmp_path / "cache",
        s3_presigned_downloads=presigned,
    )


# Requests per provider try: s3fs retries a failed GET itself, a presigned GET is sent once.
TRANSPORTS = [pytest.param(False, id="s3fs"), pytest.param(True, id="presigned")]


def tries_per_attempt(presigned: bool) -> int:
    return 1 if presigned else S3FS_TRIES


def staged_files(directory: Path) -> dict[str, bytes]:
    """Return every file under ``directory`` by its '/'-separated relative path."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def temporary_files(*directories: Path) -> list[Path]:
    """Return the downloads in progress (``*.part``) left under any of ``directories``."""
    return [path for directory in directories for path in directory.rglob(f"*{TEMP_SUFFIX}")]


def stage_while_paused(
    server: S3TestServer, stage: Callable[[], StagingResult], in_flight: int, timeout: float = 90
) -> StagingResult:
    """Run ``stage`` in a thread while the server holds every object GET, and release them once
    ``in_flight`` GETs are waiting at the same time.

    :raises TimeoutError: fewer than ``in_flight`` GETs were ever held at once.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = stage()
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = err

    server.pause_object_gets()
    thread = threading.Thread(target=run, name="staging", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while server.stats().object_gets_in_flight < in_flight:
            if not thread.is_alive():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {server.stats().object_gets_in_flight} of {in_flight} object GETs were "
                    f"in flight at once after {timeout} s"
                )
            time.sleep(0.01)
    finally:
        server.resume_object_gets()
        thread.join(timeout=240)
    assert not thread.is_alive(), "the staging did not finish within 240 s after the GETs were released"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class TestTrees:
    @pytest.mark.parametrize("cache", [pytest.param(False, id="direct"), pytest.param(True, id="cache")])
    def test_nested_tree_arrives(self, s3_bucket: S3Bucket, tmp_path: Path, cache: bool) -> None:
        s3_bucket.put_objects(TREE, prefix="ns/")
        work = tmp_path / "work"

        result = stage_namespace_files(
            Namespace(s3_bucket.url("ns"), storage_options=storage_options(s3_bucket.server)),
            work,
            settings=make_settings(tmp_path, cache=cache),
        )

        assert staged_files(work) == TREE
        assert result.files == len(TREE)
        assert result.bytes == sum(len(body) for body in TREE.values())
        assert result.listed == len(TREE)
        stats = s3_bucket.server.stats()
        assert {key: stats.gets_of(s3_bucket.name, f"ns/{key}") for key in TREE} == dict.fromkeys(TREE, 1)
        assert temporary_files(tmp_path) == []

    @pytest.mark.parametrize(
        "markers",
        [
            pytest.param(["ns/scripts/", "ns/scripts/etl/", "ns/no-files-below/"], id="nested-markers"),
            pytest.param(["ns/"], id="root-marker"),
        ],
    )
    def test_folder_markers_are_not_files(
        self, s3_bucket: S3Bucket, tmp_path: Path, markers: list[str]
    ) -> None:
        s3_bucket.put_objects(TREE, prefix="ns/")
        client = s3_bucket.server.boto3_client()
        for marker in markers:
            client.put_object(Bucket=s3_bucket.name, Key=marker, Body=b"")
        work = tmp_path / "work"

        result = stage_namespace_files(
            Namespace(s3_bucket.url("ns"), storage_options=storage_options(s3_bucket.server)),
            work,
            settings=make_settings(tmp_path),
        )

        assert staged_files(work) == TREE
        assert result.listed == len(TREE)
        assert not (work / "no-files-below").exists()

    def test_marker_only_namespace_stages_nothing(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        s3_bucket.put_objects(TREE, prefix="other/")
        s3_bucket.server.boto3_client().put_object(Bucket=s3_bucket.name, Key="empty/", Body=b"")
        work = tmp_path / "work"

        result = stage_namespace_files(
            Namespace(s3_bucket.url("empty"), storage_options=storage_options(s3_bucket.server)),
            work,
            settings=make_settings(tmp_path),
        )

        assert result.files == 0
        assert result.listed == 0
        assert list(work.iterdir()) == []
        assert s3_bucket.server.stats().object_gets_total == 0

    def test_missing_prefix_names_url(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        s3_bucket.put_objects(TREE, prefix="ns/")
        url = s3_bucket.url("no/such/prefix")

        with pytest.raises(NamespaceNotFoundError, match=re.escape(repr(url))):
            stage_namespace_files(
                Namespace(url, storage_options=storage_options(s3_bucket.server)),
                tmp_path / "work",
                settings=make_settings(tmp_path),
            )

    def test_missing_bucket_names_url(self, s3_server: S3TestServer, tmp_path: Path) -> None:
        url = f"s3://nsf-missing-{uuid.uuid4().hex[:12]}/ns"

        with pytest.raises(NamespaceNotFoundError, match=re.escape(repr(url))):
            stage_namespace_files(
                Namespace(url, storage_options=storage_options(s3_server)),
                tmp_path / "work",
                settings=make_settings(tmp_path),
            )


class TestParallelDownloads:
    def test_thousand_files_fill_cap_of_16(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        # 16 is above s3fs's default pool of 10 connections, so the cap is only reachable when
        # the provider sized the pool. The options carry no config_kwargs, as a user's would.
        objects = {
            f"d{index % 7}/sub{index % 3}/f{index:05d}.txt": b"line\n" * (index % 4) for index in range(1050)
        }
        s3_bucket.put_objects(objects, prefix="many/")
        server = s3_bucket.server
        server.set_get_latency(0.02)
        server.reset_counters()
        work = tmp_path / "work"

        result = stage_while_paused(
            server,
            lambda: stage_namespace_files(
                Namespace(s3_bucket.url("many"), storage_options=server.storage_options()),
                work,
                settings=make_settings(tmp_path, cap=16, host=32),
            ),
            in_flight=16,
        )

        stats = server.stats()
        assert staged_files(work) == objects
        assert result.files == len(objects)
        assert stats.object_gets_total == len(objects)
        assert stats.max_object_gets_in_flight <= 16
        assert stats.max_object_gets_in_flight == 16
        assert result.peak_in_flight == 16

    def test_large_file_is_one_get(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        # s3fs 2026.9 reads a file larger than its block size (50 MiB by default) in concurrent
        # ranged GETs unless max_concurrency is 1. An 8 MiB block makes a 24 MiB file such a file.
        payload = os.urandom(24 * 1024 * 1024)
        s3_bucket.put_objects({"big.bin": payload, "small.txt": b"small"}, prefix="ns/")
        work = tmp_path / "work"

        result = stage_namespace_files(
            Namespace(
                s3_bucket.url("ns"),
                storage_options=storage_options(s3_bucket.server, default_block_size=8 * 1024 * 1024),
            ),
            work,
            settings=make_settings(tmp_path),
        )

        staged = (work / "big.bin").read_bytes()
        assert len(staged) == len(payload)
        assert hashlib.sha256(staged).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert result.bytes == len(payload) + len(b"small")
        assert s3_bucket.server.stats().gets_of(s3_bucket.name, "ns/big.bin") == 1


class TestTransientFailures:
    @pytest.mark.parametrize("presigned", TRANSPORTS)
    @pytest.mark.parametrize("cache", [pytest.param(False, id="direct"), pytest.param(True, id="cache")])
    def test_throttling_and_dropped_body_retried(
        self, s3_bucket: S3Bucket, tmp_path: Path, cache: bool, presigned: bool
    ) -> None:
        per_attempt = tries_per_attempt(presigned)
        objects = {f"f{index:02d}.txt": f"file {index}\n".encode() * 20 for index in range(20)}
        objects["big.bin"] = os.urandom(256 * 1024)
        s3_bucket.put_objects(objects, prefix="ns/")
        server = s3_bucket.server
        throttled = ["f03.txt", "f07.txt", "f11.txt"]
        for key in throttled:
            server.fail_object_gets(f"ns/{key}", status=503, times=per_attempt, bucket=s3_bucket.name)
        # The server sends half of each body and closes the connection. s3fs resumes with ranged GETs first.
        server.drop_object_gets("ns/big.bin", times=per_attempt, bucket=s3_bucket.name)
        work = tmp_path / "work"

        result = stage_namespace_files(
            Namespace(s3_bucket.url("ns"), storage_options=storage_options(server)),
            work,
            settings=make_settings(tmp_path, max_retries=2, cache=cache, presigned=presigned),
        )

        stats = server.stats()
        assert staged_files(work) == objects
        assert result.retries == len(throttled) + 1  # one retry of the provider per faulted key
        for key in [*throttled, "big.bin"]:
            assert stats.gets_of(s3_bucket.name, f"ns/{key}") == per_attempt + 1, key
        assert stats.gets_of(s3_bucket.name, "ns/f00.txt") == 1
        assert temporary_files(tmp_path) == []

    @pytest.mark.parametrize("presigned", TRANSPORTS)
    def test_retries_exhausted_names_key(self, s3_bucket: S3Bucket, tmp_path: Path, presigned: bool) -> None:
        objects = {f"f{index}.txt": b"x" * index for index in range(6)}
        s3_bucket.put_objects(objects, prefix="ns/")
        server = s3_bucket.server
        server.fail_object_gets("ns/f1.txt", status=503, bucket=s3_bucket.name)
        url = s3_bucket.url("ns")
        work = tmp_path / "work"

        with pytest.raises(StagingError) as excinfo:
            stage_namespace_files(
                Namespace(url, storage_options=storage_options(server)),
                work,
                settings=make_settings(tmp_path, max_retries=1, presigned=presigned),
            )

        message = str(excinfo.value)
        assert f"'f1.txt' from namespace {url!r} after 2 tries (transient error)" in message
        assert "Injected by the S3 test server for key ns/f1.txt" in message  # the cause, as S3 sent it
        assert server.stats().gets_of(s3_bucket.name, "ns/f1.txt") == 2 * tries_per_attempt(presigned)
        assert not (work / "f1.txt").exists()
        assert temporary_files(tmp_path) == []


class TestPresignedTransport:
    def test_region_redirect_falls_back_to_s3fs(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        s3_bucket.put_objects({"a.txt": b"alpha", "b.txt": b"beta"}, prefix="ns/")
        server = s3_bucket.server
        server.fail_object_gets(
            "ns/a.txt", status=400, code="AuthorizationHeaderMalformed", times=1, bucket=s3_bucket.name
        )

        result = stage_namespace_files(
            Namespace(s3_bucket.url("ns"), storage_options=storage_options(server)),
            tmp_path / "work",
            settings=make_settings(tmp_path),
        )

        assert staged_files(tmp_path / "work") == {"a.txt": b"alpha", "b.txt": b"beta"}
        assert result.retries == 0  # the s3fs fallback is not a retry
        assert server.stats().gets_of(s3_bucket.name, "ns/a.txt") == 2

    def test_missing_object_is_permanent(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        s3_bucket.put_objects({"a.txt": b"alpha"}, prefix="ns/")
        server = s3_bucket.server
        server.fail_object_gets("ns/a.txt", status=404, bucket=s3_bucket.name)

        with pytest.raises(StagingError, match=r"after 1 try \(permanent error\): FileNotFoundError: .*NoSuchKey"):
            stage_namespace_files(
                Namespace(s3_bucket.url("ns"), storage_options=storage_options(server)),
                tmp_path / "work",
                settings=make_settings(tmp_path),
            )
        assert server.stats().gets_of(s3_bucket.name, "ns/a.txt") == 1

    @pytest.mark.parametrize(
        ("options", "expected"),
        [
            pytest.param({}, True, id="default"),
            pytest.param({"anon": True}, False, id="anonymous"),
            pytest.param({"requester_pays": True}, False, id="requester-pays"),
            pytest.param({"config_kwargs": {"signature_version": "s3"}}, False, id="sigv2-client"),
        ],
    )
    def test_used_only_for_plain_clients(self, s3_server: S3TestServer, options: dict, expected: bool) -> None:
        from kestra_perf_provider.namespace_files import s3_presigned
        from kestra_perf_provider.namespace_files.sources import open_filesystem

        namespace = Namespace("s3://bucket/ns", storage_options={**s3_server.storage_options(), **options})
        assert s3_presigned.supports(open_filesystem(namespace, max_connections=4)) is expected


class TestPermanentFailure:
    @pytest.mark.parametrize("cache", [pytest.param(False, id="direct"), pytest.param(True, id="cache")])
    def test_access_denied_fails_and_cancels(self, s3_bucket: S3Bucket, tmp_path: Path, cache: bool) -> None:
        objects = {f"d{index % 3}/f{index:04d}.bin": os.urandom(16 * 1024) for index in range(300)}
        s3_bucket.put_objects(objects, prefix="ns/")
        server = s3_bucket.server
        # The 21st file in listing order, so that the failure comes while other GETs are in flight.
        denied = "d0/f0060.bin"
        server.fail_object_gets(f"ns/{denied}", status=403, bucket=s3_bucket.name)
        server.set_get_latency(0.02)
        server.reset_counters()
        url = s3_bucket.url("ns")
        work = tmp_path / "work"

        with pytest.raises(StagingError) as excinfo:
            stage_namespace_files(
                Namespace(url, storage_options=storage_options(server)),
                work,
                settings=make_settings(tmp_path, cap=4, cache=cache),
            )

        message = str(excinfo.value)
        assert f"{denied!r} from namespace {url!r}" in message
        assert "after 1 try (permanent error)" in message
        stats = server.stats()
        assert stats.gets_of(s3_bucket.name, f"ns/{denied}") == 1
        assert stats.object_gets_total < len(objects)  # the remaining transfers were cancelled
        assert not (work / denied).exists()
        assert temporary_files(tmp_path) == []
        staged = staged_files(work)
        assert {path: body for path, body in staged.items() if objects.get(path) != body} == {}


class TestSeveralNamespaces:
    @pytest.fixture
    def shared_and_team(self, s3_bucket: S3Bucket) -> tuple[Namespace, Namespace]:
        team_bucket = s3_bucket.server.create_bucket()
        s3_bucket.put_objects(
            {"common.txt": b"shared", "config/app.yaml": b"shared: 1\n", "only-shared.txt": b"s"},
            prefix="ns/shared/",
        )
        s3_bucket.server.put_objects(
            team_bucket,
            {"common.txt": b"team", "config/app.yaml": b"team: 1\n", "only-team.txt": b"t"},
            prefix="ns/team-a/",
        )
        options = storage_options(s3_bucket.server)
        return (
            Namespace(s3_bucket.url("ns/shared"), storage_options=options),
            Namespace(f"s3://{team_bucket}/ns/team-a", storage_options=options),
        )

    @pytest.mark.parametrize(
        ("order", "winner"),
        [pytest.param((0, 1), "team", id="team-last"), pytest.param((1, 0), "shared", id="shared-last")],
    )
    def test_later_namespace_wins(
        self,
        shared_and_team: tuple[Namespace, Namespace],
        tmp_path: Path,
        order: tuple[int, int],
        winner: str,
    ) -> None:
        work = tmp_path / "work"

        result = stage_namespace_files(
            [shared_and_team[index] for index in order], work, settings=make_settings(tmp_path)
        )

        assert staged_files(work) == {
            "common.txt": winner.encode(),
            "config/app.yaml": f"{winner}: 1\n".encode(),
            "only-shared.txt": b"s",
            "only-team.txt": b"t",
        }
        assert result.overridden == 2
        assert result.files == 4

    def test_folder_per_namespace(
        self, shared_and_team: tuple[Namespace, Namespace], s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        s3_bucket.put_objects({"tool.sh": b"echo\n"}, prefix="tools/v1/")
        named = Namespace(
            s3_bucket.url("tools/v1"), storage_options=storage_options(s3_bucket.server), folder="tools"
        )
        work = tmp_path / "work"

        result = stage_namespace_files(
            [*shared_and_team, named], work, folder_per_namespace=True, settings=make_settings(tmp_path)
        )

        assert staged_files(work) == {
            "shared/common.txt": b"shared",
            "shared/config/app.yaml": b"shared: 1\n",
            "shared/only-shared.txt": b"s",
            "team-a/common.txt": b"team",
            "team-a/config/app.yaml": b"team: 1\n",
            "team-a/only-team.txt": b"t",
            "tools/tool.sh": b"echo\n",
        }
        assert result.overridden == 0

    def test_include_exclude_on_keys(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        objects = {
            "scripts/etl.py": b"etl",
            "scripts/lib/util.py": b"util",
            "scripts/skip-me.py": b"skipped by exclude",
            "sql/a.sql": b"a",
            "sql/deep/b.sql": b"b",
            "docs/readme.md": b"not included",
            "data/x.csv": b"not included",
            ".env": b"KEY=value",
            ".git/config": b"dot-folder",
        }
        s3_bucket.put_objects(objects, prefix="ns/")
        work = tmp_path / "work"

        result = stage_namespace_files(
            Namespace(s3_bucket.url("ns"), storage_options=storage_options(s3_bucket.server)),
            work,
            include=["scripts/**", "*.sql", ".env"],
            exclude=["**/skip-*"],
            settings=make_settings(tmp_path),
        )

        expected = ["scripts/etl.py", "scripts/lib/util.py", "sql/a.sql", "sql/deep/b.sql", ".env"]
        assert staged_files(work) == {key: objects[key] for key in expected}
        assert result.excluded == len(objects) - len(expected)
        requested = {key for key in objects if s3_bucket.server.stats().gets_of(s3_bucket.name, f"ns/{key}")}
        assert requested == set(expected)  # filtered before any download


class TestAirflowConnection:
    @staticmethod
    def define_connection(monkeypatch: pytest.MonkeyPatch, server: S3TestServer) -> str:
        conn_id = f"nsf_moto_{uuid.uuid4().hex[:8]}"
        definition = {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {"endpoint_url": server.endpoint_url, "region_name": "us-east-1"},
        }
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(definition))
        return conn_id

    def test_aws_connection_sizes_pool(
        self, s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        objects = {f"f{index:03d}.txt": f"{index}\n".encode() for index in range(60)}
        s3_bucket.put_objects(objects, prefix="ns/")
        server = s3_bucket.server
        namespace = Namespace(s3_bucket.url("ns"), conn_id=self.define_connection(monkeypatch, server))

        fs = open_filesystem(namespace, max_connections=16)
        assert fs.s3.meta.config.max_pool_connections == 16

        server.set_get_latency(0.02)
        server.reset_counters()
        work = tmp_path / "work"
        result = stage_while_paused(
            server,
            lambda: stage_namespace_files(namespace, work, settings=make_settings(tmp_path, cap=16)),
            in_flight=16,
        )

        assert staged_files(work) == objects
        assert result.files == len(objects)
        assert server.stats().max_object_gets_in_flight == 16

    def test_unknown_conn_id_fails_before_requests(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        s3_bucket.put_objects(TREE, prefix="ns/")
        s3_bucket.server.reset_counters()
        conn_id = f"nsf_undefined_{uuid.uuid4().hex[:8]}"

        with pytest.raises(UnknownConnectionError, match=re.escape(repr(conn_id))):
            stage_namespace_files(
                Namespace(s3_bucket.url("ns"), conn_id=conn_id),
                tmp_path / "work",
                settings=make_settings(tmp_path),
            )

        assert s3_bucket.server.stats().requests_total == 0


METRICS_DAG = """
import pendulum
from airflow.sdk import DAG, task

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):

    @task.namespace_files(namespaces=[{namespace!r}])
    def stage_only(namespace_files_dir=None):
        return None

    stage_only()
"""


def _read_statsd_lines(receiver: socket.socket) -> list[str]:
    receiver.setblocking(False)
    lines = []
    while True:
        try:
            datagram = receiver.recv(65535)
        except BlockingIOError:
            return lines
        lines.extend(datagram.decode().splitlines())


@pytest.mark.slow
@pytest.mark.usefixtures("airflow_db")
class TestAirflowTask:
    def test_metrics_and_summary_line(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        objects = {f"f{index}.txt": b"x" * index for index in range(7)}
        s3_bucket.put_objects(objects, prefix="ns/")
        server = s3_bucket.server
        server.fail_object_gets("ns/f3.txt", status=503, times=1, bucket=s3_bucket.name)
        dags = tmp_path / "dags"
        dags.mkdir()
        dag_id = "namespace_files_metrics"
        namespace = {"url": s3_bucket.url("ns"), "storage_options": storage_options(server)}
        (dags / f"{dag_id}.py").write_text(METRICS_DAG.format(dag_id=dag_id, namespace=namespace))
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        env = {
            **os.environ,
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(receiver.getsockname()[1]),
            "AIRFLOW__METRICS__STATSD_PREFIX": "nsftest",
            "AIRFLOW__NAMESPACE_FILES__BUDGET_DIR": str(tmp_path / "budget"),
            "AIRFLOW__NAMESPACE_FILES__CACHE_ENABLED": "False",
            "AIRFLOW__NAMESPACE_FILES__MAX_RETRIES": "2",
        }

        try:
            completed = subprocess.run(
                [sys.executable, "-m", "airflow", "dags", "test", dag_id],
                check=False,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            statsd_lines = _read_statsd_lines(receiver)
        finally:
            receiver.close()

        output = completed.stdout + completed.stderr
        assert "state=success" in output, output[-4000:]
        summaries = [line for line in output.splitlines() if "Staged namespace files:" in line]
        assert len(summaries) == 1, summaries
        assert "[info" in summaries[0]
        assert " files=7 " in summaries[0]
        seconds = float(re.search(r" seconds=([0-9.]+) ", summaries[0]).group(1))

        metrics: dict[str, list[str]] = {}
        for line in statsd_lines:
            name, _, value = line.partition(":")
            if name.startswith("nsftest.namespace_files."):
                metrics.setdefault(name.removeprefix("nsftest."), []).append(value)
        assert metrics.get("namespace_files.files") == ["7|c"]
        assert metrics.get("namespace_files.bytes") == [f"{sum(len(body) for body in objects.values())}|c"]
        assert metrics.get("namespace_files.retries") == ["1|c"]
        durations = metrics.get("namespace_files.duration", [])
        assert len(durations) == 1, durations
        assert durations[0].endswith("|ms")
        # The timer and the summary line report the same measurement; the line rounds to 1 ms.
        assert float(durations[0].removesuffix("|ms")) / 1000 == pytest.approx(seconds, abs=0.0011)
