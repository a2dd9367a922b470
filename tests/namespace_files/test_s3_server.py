"""Tests of the moto-based S3 test server: counters, concurrency, latency and faults."""

from __future__ import annotations

import http.client
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import fsspec
import pytest
from botocore.exceptions import ClientError, ResponseStreamingError

from tests.support.s3_server import S3TestServer, S3TestServerProcess

if TYPE_CHECKING:
    from tests.support.s3_server import S3Bucket

OBJECTS = {
    "a.txt": b"alpha" * 100,
    "b.txt": b"bravo" * 200,
    "dir/c.txt": b"charlie" * 300,
}


def _get_concurrently(
    bucket: S3Bucket, keys: list[str], barrier: threading.Barrier | None = None
) -> list[bytes]:
    client = bucket.server.boto3_client(max_pool_connections=len(keys), max_attempts=1)
    bodies: list[bytes] = [b""] * len(keys)
    errors: list[BaseException] = []

    def get(index: int) -> None:
        try:
            if barrier is not None:
                barrier.wait(timeout=30)
            bodies[index] = client.get_object(Bucket=bucket.name, Key=keys[index])["Body"].read()
        except Exception as err:  # noqa: BLE001 - the caller asserts that none was raised
            errors.append(err)

    threads = [threading.Thread(target=get, args=(index,)) for index in range(len(keys))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return bodies


def _error_of(call) -> ClientError:
    with pytest.raises(ClientError) as excinfo:
        call()
    return excinfo.value


class TestCounters:
    def test_object_gets_counted_per_key(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.reset_counters()
        client = server.boto3_client()

        client.get_object(Bucket=s3_bucket.name, Key="a.txt")["Body"].read()
        client.get_object(Bucket=s3_bucket.name, Key="a.txt")["Body"].read()
        client.get_object(Bucket=s3_bucket.name, Key="dir/c.txt")["Body"].read()

        stats = server.stats()
        assert stats.gets_of(s3_bucket.name, "a.txt") == 2
        assert stats.gets_of(s3_bucket.name, "dir/c.txt") == 1
        assert stats.gets_of(s3_bucket.name, "b.txt") == 0
        assert stats.object_gets_total == 3
        assert stats.object_gets_in_flight == 0
        assert stats.first_object_get_seconds is not None
        assert stats.last_object_get_done_seconds is not None
        assert stats.last_object_get_done_seconds >= stats.first_object_get_seconds

    def test_head_and_list_not_object_gets(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.reset_counters()
        client = server.boto3_client()

        client.head_object(Bucket=s3_bucket.name, Key="a.txt")
        client.list_objects_v2(Bucket=s3_bucket.name, Prefix="dir/")
        client.get_object_tagging(Bucket=s3_bucket.name, Key="a.txt")

        stats = server.stats()
        assert stats.object_gets_total == 0
        assert stats.head_objects_total == 1
        assert stats.lists_total == 1
        assert stats.requests_total == 3

    def test_reset_zeroes_counters(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.boto3_client().get_object(Bucket=s3_bucket.name, Key="a.txt")["Body"].read()
        assert server.stats().object_gets_total == 1

        server.reset_counters()

        stats = server.stats()
        assert stats.object_gets_total == 0
        assert stats.object_gets_by_key == {}
        assert stats.max_object_gets_in_flight == 0
        assert stats.requests_total == 0
        assert stats.first_object_get_seconds is None
        assert stats.last_object_get_done_seconds is None

    def test_request_cpu_accumulates(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.reset_counters()

        server.boto3_client().get_object(Bucket=s3_bucket.name, Key="b.txt")["Body"].read()

        assert server.stats().request_cpu_seconds > 0


class TestConcurrency:
    def test_paused_gets_all_in_flight(self, s3_bucket: S3Bucket) -> None:
        keys = [f"f{index}" for index in range(8)]
        s3_bucket.put_objects({key: key.encode() * 10 for key in keys})
        server = s3_bucket.server
        server.reset_counters()
        server.pause_object_gets()
        result: list[list[bytes]] = []
        getter = threading.Thread(target=lambda: result.append(_get_concurrently(s3_bucket, keys)))
        getter.start()
        try:
            paused_stats = server.wait_for_object_gets_in_flight(8)
        finally:
            server.resume_object_gets()
            getter.join(timeout=60)

        assert paused_stats.object_gets_in_flight == 8
        assert result == [[key.encode() * 10 for key in keys]]
        stats = server.stats()
        assert stats.max_object_gets_in_flight == 8
        assert stats.object_gets_in_flight == 0
        assert stats.object_gets_total == 8

    def test_latency_overlaps_concurrent_gets(self, s3_bucket: S3Bucket) -> None:
        keys = [f"f{index}" for index in range(8)]
        s3_bucket.put_objects({key: b"x" * 64 for key in keys})
        server = s3_bucket.server
        # A long latency keeps every GET in flight until all 8 have arrived, which
        # only happens if the sleep runs in each request thread, not under a lock.
        server.set_get_latency(1.0)
        server.reset_counters()

        _get_concurrently(s3_bucket, keys, barrier=threading.Barrier(len(keys)))

        stats = server.stats()
        assert stats.max_object_gets_in_flight == 8
        assert stats.object_gets_total == 8
        assert stats.object_get_seconds_total >= 8 * 1.0

    def test_s3fs_pool_bounds_in_flight(self, s3_bucket: S3Bucket) -> None:
        keys = [f"f{index:02d}" for index in range(20)]
        s3_bucket.put_objects({key: b"y" * 128 for key in keys}, prefix="ns/")
        server = s3_bucket.server
        server.set_get_latency(0.05)
        fs = server.s3fs_filesystem(max_pool_connections=4)
        paths = fs.find(f"{s3_bucket.name}/ns")
        server.reset_counters()

        contents = fs.cat(paths)

        assert len(contents) == 20
        stats = server.stats()
        assert stats.object_gets_total == 20
        assert stats.max_object_gets_in_flight == 4


class TestFaults:
    def test_transient_slowdown_then_object(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.fail_object_gets("a.txt", status=503, times=2)
        client = server.boto3_client(max_attempts=1)

        def get() -> bytes:
            return client.get_object(Bucket=s3_bucket.name, Key="a.txt")["Body"].read()

        for _ in range(2):
            error = _error_of(get)
            assert error.response["Error"]["Code"] == "SlowDown"
            assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert get() == OBJECTS["a.txt"]
        stats = server.stats()
        assert stats.gets_of(s3_bucket.name, "a.txt") == 3
        assert stats.faults_injected_total == 2

    @pytest.mark.parametrize(
        ("status", "code"),
        [
            pytest.param(403, "AccessDenied", id="forbidden"),
            pytest.param(500, "InternalError", id="internal-error"),
        ],
    )
    def test_permanent_status_every_get(self, s3_bucket: S3Bucket, status: int, code: str) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.fail_object_gets("b.txt", status=status)
        client = server.boto3_client(max_attempts=1)

        for _ in range(3):
            error = _error_of(lambda: client.get_object(Bucket=s3_bucket.name, Key="b.txt"))
            assert error.response["Error"]["Code"] == code
            assert error.response["ResponseMetadata"]["HTTPStatusCode"] == status
        assert server.stats().gets_of(s3_bucket.name, "b.txt") == 3

    def test_custom_error_code(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        s3_bucket.server.fail_object_gets("a.txt", status=400, code="RequestTimeout", times=1)
        client = s3_bucket.server.boto3_client(max_attempts=1)

        error = _error_of(lambda: client.get_object(Bucket=s3_bucket.name, Key="a.txt"))

        assert error.response["Error"]["Code"] == "RequestTimeout"
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400

    def test_fault_only_hits_its_key(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.fail_object_gets("a.txt", status=403)
        client = server.boto3_client(max_attempts=1)

        assert client.get_object(Bucket=s3_bucket.name, Key="b.txt")["Body"].read() == OBJECTS["b.txt"]
        assert server.stats().faults_injected_total == 0

    def test_fault_only_hits_its_bucket(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.fail_object_gets("a.txt", status=403, bucket=f"{s3_bucket.name}-other")
        client = server.boto3_client(max_attempts=1)

        assert client.get_object(Bucket=s3_bucket.name, Key="a.txt")["Body"].read() == OBJECTS["a.txt"]

    def test_clear_faults_restores_objects(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.fail_object_gets("a.txt", status=500)
        server.clear_faults()

        body = (
            server.boto3_client(max_attempts=1).get_object(Bucket=s3_bucket.name, Key="a.txt")["Body"].read()
        )

        assert body == OBJECTS["a.txt"]

    def test_drop_sends_partial_body(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.drop_object_gets("dir/c.txt", after_bytes=100)
        # A presigned URL lets a plain HTTP client, which exposes the partial body, pass moto's auth.
        url = urlsplit(
            server.boto3_client().generate_presigned_url(
                "get_object", Params={"Bucket": s3_bucket.name, "Key": "dir/c.txt"}
            )
        )
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            connection.request("GET", f"{url.path}?{url.query}")
            response = connection.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Length") == str(len(OBJECTS["dir/c.txt"]))
            with pytest.raises(http.client.IncompleteRead) as excinfo:
                response.read()
        finally:
            connection.close()

        assert excinfo.value.partial == OBJECTS["dir/c.txt"][:100]

    def test_drop_once_then_object(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        server = s3_bucket.server
        server.drop_object_gets("b.txt", times=1)
        client = server.boto3_client(max_attempts=1)

        with pytest.raises(ResponseStreamingError, match="IncompleteRead"):
            client.get_object(Bucket=s3_bucket.name, Key="b.txt")["Body"].read()
        body = client.get_object(Bucket=s3_bucket.name, Key="b.txt")["Body"].read()

        assert body == OBJECTS["b.txt"]
        assert server.stats().gets_of(s3_bucket.name, "b.txt") == 2

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            pytest.param({"status": 200}, "HTTP error status", id="success-status"),
            pytest.param({"times": 0}, "times must be >= 1", id="zero-times"),
        ],
    )
    def test_invalid_fault_rejected(self, s3_bucket: S3Bucket, kwargs: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            s3_bucket.server.fail_object_gets("a.txt", **kwargs)

    def test_negative_latency_rejected(self, s3_bucket: S3Bucket) -> None:
        with pytest.raises(ValueError, match="GET latency must be >= 0"):
            s3_bucket.server.set_get_latency(-0.1)


class TestKeepAlive:
    def test_requests_share_one_connection(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS)
        client = s3_bucket.server.boto3_client()
        put_url = urlsplit(
            client.generate_presigned_url("put_object", Params={"Bucket": s3_bucket.name, "Key": "new.txt"})
        )
        get_url = urlsplit(
            client.generate_presigned_url("get_object", Params={"Bucket": s3_bucket.name, "Key": "new.txt"})
        )
        connection = http.client.HTTPConnection(put_url.hostname, put_url.port, timeout=30)
        try:
            connection.request("PUT", f"{put_url.path}?{put_url.query}", body=b"uploaded body")
            put_response = connection.getresponse()
            put_response.read()
            first_socket = connection.sock

            connection.request("GET", f"{get_url.path}?{get_url.query}")
            get_response = connection.getresponse()
            body = get_response.read()
            second_socket = connection.sock
        finally:
            connection.close()

        assert put_response.status == 200
        assert put_response.getheader("Connection") is None
        assert get_response.status == 200
        assert body == b"uploaded body"
        assert first_socket is not None
        assert second_socket is first_socket

    def test_without_keep_alive_connection_closes(self) -> None:
        with S3TestServer(keep_alive=False) as server:
            bucket = server.create_bucket()
            server.put_objects(bucket, OBJECTS)
            url = urlsplit(
                server.boto3_client().generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": "a.txt"}
                )
            )
            connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            try:
                connection.request("GET", f"{url.path}?{url.query}")
                response = connection.getresponse()
                body = response.read()
            finally:
                connection.close()

        assert body == OBJECTS["a.txt"]
        assert response.getheader("Connection") == "close"


class TestClientHelpers:
    def test_s3fs_filesystem_reads_tree(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS, prefix="ns/team-a/")
        fs = s3_bucket.server.s3fs_filesystem(max_pool_connections=16)

        found = fs.find(f"{s3_bucket.name}/ns/team-a")

        assert sorted(found) == sorted(f"{s3_bucket.name}/ns/team-a/{key}" for key in OBJECTS)
        assert fs.cat(f"{s3_bucket.name}/ns/team-a/dir/c.txt") == OBJECTS["dir/c.txt"]

    def test_storage_options_work_with_fsspec(self, s3_bucket: S3Bucket) -> None:
        s3_bucket.put_objects(OBJECTS, prefix="ns/")
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_bucket.server.storage_options())

        assert fs.cat(f"{s3_bucket.url('ns/a.txt')}") == OBJECTS["a.txt"]


class TestServerProcess:
    def test_control_api_over_http(self) -> None:
        with S3TestServerProcess() as server:
            bucket = server.create_bucket()
            server.put_objects(bucket, OBJECTS)
            server.fail_object_gets("a.txt", status=503, times=1)
            server.reset_counters()
            client = server.boto3_client(max_attempts=1)

            error = _error_of(lambda: client.get_object(Bucket=bucket, Key="a.txt"))
            body = client.get_object(Bucket=bucket, Key="a.txt")["Body"].read()
            stats = server.stats()

        assert error.response["Error"]["Code"] == "SlowDown"
        assert body == OBJECTS["a.txt"]
        assert stats.gets_of(bucket, "a.txt") == 2
        assert stats.faults_injected_total == 1
        assert stats.process_cpu_seconds > 0

    def test_invalid_control_call_rejected(self) -> None:
        with S3TestServerProcess() as server:
            with pytest.raises(ValueError, match="times must be >= 1"):
                server.fail_object_gets("a.txt", times=0)
            with pytest.raises(ValueError, match="unknown control operation"):
                server._control("shutdown")
