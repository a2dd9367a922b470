"""A real S3 server on 127.0.0.1 for tests and benchmarks.

The server is moto's WSGI application served by a threaded werkzeug server on an
OS-assigned port, wrapped in :class:`S3TestMiddleware`, which adds what a test of a
parallel downloader needs and moto lacks:

* a fixed latency before each object GET, slept in the request thread so that
  concurrent GETs overlap as they do against a real S3 endpoint;
* counters: object GETs per key and in total, the number of object GETs in flight
  and its maximum, HEAD and LIST requests, and server CPU time;
* fault injection per key: error statuses (transient or permanent) and a connection
  dropped in the middle of the body.

s3fs talks to S3 through aiobotocore, which moto's in-process ``mock_aws`` does not
intercept, so clients must reach this server over HTTP.

:class:`S3TestServer` runs the server in a thread of the calling process, which lets
tests use the Python API of the middleware directly. :class:`S3TestServerProcess`
runs it in a child process (``python -m tests.support.s3_server``) with the same API
sent over an HTTP control path, so a benchmark's client does not share a GIL and a
CPU account with moto.

Requests are parsed as path-style (``/bucket/key``), which is what botocore,
aiobotocore and s5cmd send to an ``http://127.0.0.1:PORT`` endpoint.

werkzeug's own request handler sends ``Connection: close`` with every response, so
by default the server uses a handler that keeps HTTP/1.1 connections open, which
lets clients reuse pooled connections as they do against S3. ``keep_alive=False``
restores werkzeug's handler.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qsl, unquote

if TYPE_CHECKING:
    from collections.abc import Callable

    import s3fs
    from werkzeug.serving import BaseWSGIServer

log = logging.getLogger(__name__)

#: Dummy credentials and region that moto accepts. Clients built by the helpers here
#: receive them as arguments, never through the process environment.
TEST_ACCESS_KEY_ID = "testing"
TEST_SECRET_ACCESS_KEY = "testing"
TEST_REGION = "us-east-1"

#: Path prefix of the control API of :class:`S3TestMiddleware`. No S3 bucket can be
#: named like this because bucket names cannot start with an underscore.
CONTROL_PATH_PREFIX = "/_s3_test_server/"

# Query parameters that still make a GET on /bucket/key a GetObject call. Any other
# parameter (tagging, acl, uploadId, attributes ...) selects a sub-resource.
# The signature parameters are those of presigned URLs (SigV4 and SigV2).
_OBJECT_GET_QUERY_KEYS = frozenset(
    {"versionId", "partNumber", "x-id", "AWSAccessKeyId", "Signature", "Expires"}
)
_OBJECT_GET_QUERY_PREFIXES = ("response-", "X-Amz-")
_LIST_QUERY_KEYS = frozenset(
    {
        "list-type",
        "prefix",
        "delimiter",
        "continuation-token",
        "max-keys",
        "start-after",
        "encoding-type",
        "marker",
        "fetch-owner",
    }
)

# S3 error codes sent with an injected status when the caller names none.
_DEFAULT_ERROR_CODES = {
    400: "InvalidRequest",
    403: "AccessDenied",
    404: "NoSuchKey",
    500: "InternalError",
    503: "SlowDown",
}

# Upper bound on how long a paused GET waits for resume_object_gets(), so a test that
# forgets to resume fails with errors instead of hanging the whole session.
_PAUSE_TIMEOUT_SECONDS = 120.0

_OBJECT_GET = "object_get"
_HEAD_OBJECT = "head_object"
_LIST = "list"
_OTHER = "other"


@dataclasses.dataclass(frozen=True)
class S3ServerStats:
    """Snapshot of the counters of :class:`S3TestMiddleware` since the last reset.

    Keys of ``object_gets_by_key`` are ``"bucket/key"``.
    """

    requests_total: int
    object_gets_total: int
    object_gets_by_key: dict[str, int]
    object_gets_in_flight: int
    max_object_gets_in_flight: int
    head_objects_total: int
    lists_total: int
    faults_injected_total: int
    #: CPU time spent inside request handling (moto and this middleware), summed over
    #: the request threads with :func:`time.thread_time`. It excludes werkzeug's
    #: parsing of the request line and headers.
    request_cpu_seconds: float
    #: User plus system CPU of the whole process that hosts the server. It includes
    #: the client too when both run in one process, so it is only meaningful for
    #: :class:`S3TestServerProcess`.
    process_cpu_seconds: float
    #: Wall-clock seconds since the last reset.
    elapsed_seconds: float
    #: Seconds from the last reset to the arrival of the first object GET, or ``None``.
    first_object_get_seconds: float | None = None
    #: Seconds from the last reset to the end of the latest finished object GET, or ``None``.
    last_object_get_done_seconds: float | None = None
    #: Sum over finished object GETs of the seconds from arrival to the hand-over of the
    #: last body byte, added latency included. Divided by the time from the first GET to
    #: the last, it is the mean number of GETs in flight.
    object_get_seconds_total: float = 0.0

    def gets_of(self, bucket: str, key: str) -> int:
        """Return the number of object GETs received for ``bucket/key``."""
        return self.object_gets_by_key.get(f"{bucket}/{key}", 0)


@dataclasses.dataclass
class _FaultRule:
    bucket: str | None
    key: str
    #: HTTP status of the injected error response, or ``None`` to drop the connection mid-body.
    status: int | None
    code: str | None
    #: Bytes of the body sent before the drop; ``None`` means half the body.
    after_bytes: int | None
    #: Matching GETs still to fault; ``None`` means every one.
    remaining: int | None

    def matches(self, bucket: str, key: str) -> bool:
        if self.remaining == 0 or self.key != key:
            return False
        return self.bucket is None or self.bucket == bucket


@dataclasses.dataclass(frozen=True)
class _ParsedRequest:
    method: str
    bucket: str
    key: str
    kind: str


def _parse_request(environ: Mapping[str, Any]) -> _ParsedRequest:
    method = environ["REQUEST_METHOD"]
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
    path, _, query = raw_uri.partition("?")
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    query_keys = {name for name, _ in parse_qsl(query, keep_blank_values=True)}

    kind = _OTHER
    if bucket and key:
        if method == "HEAD":
            kind = _HEAD_OBJECT
        elif method == "GET" and all(
            name in _OBJECT_GET_QUERY_KEYS or name.startswith(_OBJECT_GET_QUERY_PREFIXES)
            for name in query_keys
        ):
            kind = _OBJECT_GET
    elif bucket and method == "GET" and query_keys <= _LIST_QUERY_KEYS:
        kind = _LIST
    return _ParsedRequest(method=method, bucket=bucket, key=key, kind=kind)


def _process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _error_body(code: str, message: str, bucket: str, key: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<BucketName>{bucket}</BucketName><Key>{key}</Key>"
        f"<RequestId>{uuid.uuid4().hex}</RequestId></Error>"
    ).encode()


class _ResponseBody:
    """WSGI response iterable that runs ``on_done`` exactly once per response.

    ``on_done`` runs after the last chunk has been handed to the server, or when the
    server closes the iterable early.
    """

    def __init__(self, chunks: Iterable[bytes], on_done: Callable[[], None]) -> None:
        self._chunks = chunks
        self._on_done: Callable[[], None] | None = on_done

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        finally:
            self.close()

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def close(self) -> None:
        try:
            close_inner = getattr(self._chunks, "close", None)
            if close_inner is not None:
                close_inner()
        finally:
            self._done()


class _ObjectGetBody(_ResponseBody):
    """Body of an object GET, optionally cut short by a dropped connection.

    ``on_done`` runs just before the final bytes are handed to the socket, so a client
    that has read the whole body never sees its GET still counted as in flight.
    """

    def __init__(
        self,
        payload: bytes,
        on_done: Callable[[], None],
        drop_after: int | None = None,
        connection: socket.socket | None = None,
    ) -> None:
        super().__init__((), on_done)
        self._payload = payload
        self._drop_after = drop_after
        self._connection = connection

    def __iter__(self) -> Iterator[bytes]:
        try:
            self._done()
            if self._drop_after is None:
                yield self._payload
                return
            # Yielding even an empty chunk makes werkzeug send the status line and headers.
            yield self._payload[: self._drop_after]
            assert self._connection is not None
            try:
                self._connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            # werkzeug treats a ConnectionError as a client that went away and logs nothing.
            raise ConnectionResetError(
                f"connection dropped after {self._drop_after} of {len(self._payload)} body bytes by a fault rule"
            )
        finally:
            self.close()


class S3TestMiddleware:
    """WSGI middleware around moto that adds GET latency, counters and faults.

    All public methods are thread-safe. Apart from :meth:`__call__`, each of them is
    also reachable as ``POST {CONTROL_PATH_PREFIX}<method>`` with the keyword
    arguments as a JSON object, which is how :class:`S3TestServerProcess` drives a
    server in another process.

    :param app: moto's WSGI application.
    :param get_latency_seconds: delay added before the response to each object GET.
    """

    CONTROL_OPERATIONS = frozenset(
        {
            "set_get_latency",
            "fail_object_gets",
            "drop_object_gets",
            "clear_faults",
            "pause_object_gets",
            "resume_object_gets",
            "reset_counters",
            "stats",
        }
    )

    def __init__(self, app: Callable[..., Iterable[bytes]], get_latency_seconds: float = 0.0) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._gets_released = threading.Event()
        self._gets_released.set()
        self._faults: list[_FaultRule] = []
        self._get_latency = 0.0
        self.set_get_latency(get_latency_seconds)
        self._reset_counters_locked()

    # -- configuration -----------------------------------------------------------------

    def set_get_latency(self, seconds: float) -> None:
        """Set the delay slept in the request thread before the response to each object GET."""
        seconds = float(seconds)
        if seconds < 0:
            raise ValueError(f"GET latency must be >= 0 seconds, got {seconds!r}")
        with self._lock:
            self._get_latency = seconds

    def fail_object_gets(
        self,
        key: str,
        *,
        status: int = 503,
        code: str | None = None,
        times: int | None = None,
        bucket: str | None = None,
    ) -> None:
        """Respond to GETs of ``key`` with an S3 error instead of the object.

        :param key: object key, without the bucket.
        :param status: HTTP status, e.g. 503 (transient, retried by botocore) or 403.
        :param code: S3 error code in the XML body; derived from ``status`` if omitted
            (503 SlowDown, 500 InternalError, 403 AccessDenied, 404 NoSuchKey).
        :param times: fault only the next ``times`` matching GETs; ``None`` faults all.
        :param bucket: restrict the rule to one bucket; ``None`` matches any bucket.
        """
        status = int(status)
        if not 400 <= status <= 599:
            raise ValueError(f"injected status must be an HTTP error status (400-599), got {status!r}")
        if code is None:
            code = _DEFAULT_ERROR_CODES.get(status, "InternalError")
        self._add_fault(_FaultRule(bucket, key, status, code, None, self._check_times(times)))

    def drop_object_gets(
        self,
        key: str,
        *,
        after_bytes: int | None = None,
        times: int | None = None,
        bucket: str | None = None,
    ) -> None:
        """Close the connection in the middle of the body of GETs of ``key``.

        The status line and headers, with the full ``Content-Length``, are sent first,
        then ``after_bytes`` bytes of the body, then the socket is shut down, so the
        client sees a truncated body.

        :param key: object key, without the bucket.
        :param after_bytes: bytes of the body to send before the drop; ``None`` sends
            half of the body. A value at or above the object size sends the whole body
            and then drops the connection, which is not a partial response.
        :param times: fault only the next ``times`` matching GETs; ``None`` faults all.
        :param bucket: restrict the rule to one bucket; ``None`` matches any bucket.
        """
        if after_bytes is not None and after_bytes < 0:
            raise ValueError(f"after_bytes must be >= 0 or None, got {after_bytes!r}")
        self._add_fault(_FaultRule(bucket, key, None, None, after_bytes, self._check_times(times)))

    def clear_faults(self) -> None:
        """Remove all fault rules."""
        with self._lock:
            self._faults.clear()

    def pause_object_gets(self) -> None:
        """Hold arriving object GETs, counted as in flight, until :meth:`resume_object_gets`."""
        self._gets_released.clear()

    def resume_object_gets(self) -> None:
        """Release object GETs held by :meth:`pause_object_gets`."""
        self._gets_released.set()

    def reset_counters(self) -> None:
        """Zero all counters; GETs in flight now still finish and are not counted."""
        with self._lock:
            self._reset_counters_locked()

    def stats(self) -> S3ServerStats:
        """Return a snapshot of the counters."""
        with self._lock:
            return S3ServerStats(
                requests_total=self._requests_total,
                object_gets_total=sum(self._gets_by_key.values()),
                object_gets_by_key=dict(self._gets_by_key),
                object_gets_in_flight=self._in_flight,
                max_object_gets_in_flight=self._max_in_flight,
                head_objects_total=self._heads_total,
                lists_total=self._lists_total,
                faults_injected_total=self._faults_injected,
                request_cpu_seconds=self._request_cpu,
                process_cpu_seconds=_process_cpu_seconds() - self._process_cpu_at_reset,
                elapsed_seconds=time.monotonic() - self._reset_at,
                first_object_get_seconds=self._since_reset(self._first_get_at),
                last_object_get_done_seconds=self._since_reset(self._last_get_done_at),
                object_get_seconds_total=self._get_seconds,
            )

    def _since_reset(self, moment: float | None) -> float | None:
        return None if moment is None else moment - self._reset_at

    @staticmethod
    def _check_times(times: int | None) -> int | None:
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None for every GET, got {times!r}")
        return times

    def _add_fault(self, rule: _FaultRule) -> None:
        with self._lock:
            self._faults.append(rule)

    def _reset_counters_locked(self) -> None:
        self._generation = getattr(self, "_generation", 0) + 1
        self._requests_total = 0
        self._gets_by_key: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self._heads_total = 0
        self._lists_total = 0
        self._faults_injected = 0
        self._request_cpu = 0.0
        self._process_cpu_at_reset = _process_cpu_seconds()
        self._reset_at = time.monotonic()
        self._first_get_at: float | None = None
        self._last_get_done_at: float | None = None
        self._get_seconds = 0.0

    # -- request handling --------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(CONTROL_PATH_PREFIX):
            return self._serve_control(environ, start_response)

        request = _parse_request(environ)
        cpu_started = time.thread_time()
        arrived = time.monotonic()
        if request.kind != _OBJECT_GET:
            with self._lock:
                generation = self._generation
                self._requests_total += 1
                self._heads_total += request.kind == _HEAD_OBJECT
                self._lists_total += request.kind == _LIST
            body = self._app(environ, start_response)
            return _ResponseBody(body, lambda: self._finish_request(generation, cpu_started, arrived, False))

        with self._lock:
            generation = self._generation
            self._requests_total += 1
            self._gets_by_key[f"{request.bucket}/{request.key}"] += 1
            self._in_flight += 1
            if self._first_get_at is None:
                self._first_get_at = time.monotonic()
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            rule = self._take_fault_locked(request)
            latency = self._get_latency
        try:
            return self._respond_to_object_get(
                environ,
                start_response,
                request,
                rule,
                latency,
                lambda: self._finish_request(generation, cpu_started, arrived, True),
            )
        except BaseException:
            self._finish_request(generation, cpu_started, arrived, True)
            raise

    def _take_fault_locked(self, request: _ParsedRequest) -> _FaultRule | None:
        for rule in self._faults:
            if rule.matches(request.bucket, request.key):
                if rule.remaining is not None:
                    rule.remaining -= 1
                self._faults_injected += 1
                # Copy so that the caller's view does not change under a concurrent clear.
                return dataclasses.replace(rule)
        return None

    def _respond_to_object_get(
        self,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        request: _ParsedRequest,
        rule: _FaultRule | None,
        latency: float,
        on_done: Callable[[], None],
    ) -> Iterable[bytes]:
        if not self._gets_released.wait(_PAUSE_TIMEOUT_SECONDS):
            log.error(
                "Object GET bucket=%s key=%s was paused for over %s s; releasing it now",
                request.bucket,
                request.key,
                _PAUSE_TIMEOUT_SECONDS,
            )
        if latency:
            time.sleep(latency)

        if rule is not None and rule.status is not None:
            payload = self._error_payload(start_response, request, rule)
            return _ObjectGetBody(payload, on_done)

        # Objects in tests and benchmarks are small, so buffering moto's body costs
        # little and lets the body know its last chunk before handing it over.
        body = self._app(environ, start_response)
        try:
            payload = b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        if rule is None:
            return _ObjectGetBody(payload, on_done)
        cut = len(payload) // 2 if rule.after_bytes is None else rule.after_bytes
        return _ObjectGetBody(payload, on_done, drop_after=cut, connection=environ["werkzeug.socket"])

    @staticmethod
    def _error_payload(
        start_response: Callable[..., Any], request: _ParsedRequest, rule: _FaultRule
    ) -> bytes:
        assert rule.status is not None and rule.code is not None
        message = f"Injected by the S3 test server for key {request.key}"
        payload = _error_body(rule.code, message, request.bucket, request.key)
        reason = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Slow Down"}
        start_response(
            f"{rule.status} {reason.get(rule.status, 'Error')}",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(payload)))],
        )
        return payload

    def _finish_request(self, generation: int, cpu_started: float, arrived: float, object_get: bool) -> None:
        cpu = time.thread_time() - cpu_started
        now = time.monotonic()
        with self._lock:
            # A request that started before reset_counters() belongs to the old counters.
            if generation != self._generation:
                return
            self._request_cpu += cpu
            if object_get:
                self._in_flight -= 1
                self._last_get_done_at = now
                self._get_seconds += now - arrived

    # -- control API -------------------------------------------------------------------

    def _serve_control(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        operation = environ["PATH_INFO"][len(CONTROL_PATH_PREFIX) :]
        status, result = "200 OK", None
        try:
            if environ["REQUEST_METHOD"] != "POST":
                raise ValueError(
                    f"control operations must be sent with POST, got {environ['REQUEST_METHOD']}"
                )
            if operation not in self.CONTROL_OPERATIONS:
                raise ValueError(
                    f"unknown control operation {operation!r}; expected one of {sorted(self.CONTROL_OPERATIONS)}"
                )
            length = int(environ.get("CONTENT_LENGTH") or 0)
            kwargs = json.loads(environ["wsgi.input"].read(length) or b"{}")
            result = getattr(self, operation)(**kwargs)
            if isinstance(result, S3ServerStats):
                result = dataclasses.asdict(result)
            payload = json.dumps({"result": result}).encode()
        except (TypeError, ValueError) as err:
            status = "400 Bad Request"
            payload = json.dumps({"error": str(err)}).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]


def _request_handler_class(keep_alive: bool) -> type:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class QuietRequestHandler(MotoRequestHandler):
        # One access-log line per request would flood test output and cost CPU in
        # benchmarks; errors are still logged through log_error.
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    if not keep_alive:
        return QuietRequestHandler

    class KeepAliveRequestHandler(QuietRequestHandler):
        """Request handler that keeps HTTP/1.1 connections open between requests.

        werkzeug's own handler sends ``Connection: close`` with every response because
        it cannot tell where an unread request body ends. This one reads a request body
        with a ``Content-Length`` completely before calling the application, and closes
        the connection after a chunked request body, so the next request line is always
        found where it should be.
        """

        protocol_version = "HTTP/1.1"
        # Idle keep-alive connections each occupy a thread; close them after this many seconds.
        timeout = 120

        def setup(self) -> None:
            super().setup()
            # Headers and body leave in separate writes. With Nagle's algorithm on, the
            # body then waits for the client's delayed ACK (about 40 ms on Linux) on a
            # reused connection, which would add to every GET.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def run_wsgi(self) -> None:
            if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.environ = environ = self.make_environ()
            if environ.get("wsgi.input_terminated"):
                self.close_connection = True
            else:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                environ["wsgi.input"] = io.BytesIO(self.rfile.read(length) if length > 0 else b"")

            response = _BufferedResponse(self)
            try:
                body = self.server.app(environ, response.start_response)
                try:
                    for chunk in body:
                        response.write(chunk)
                    response.finish()
                finally:
                    close = getattr(body, "close", None)
                    if close is not None:
                        close()
            except (ConnectionError, TimeoutError) as err:
                self.close_connection = True
                self.connection_dropped(err, environ)
            except Exception:
                self.close_connection = True
                log.exception("S3 test server failed on %s %s", self.command, self.path)
                if not response.headers_sent:
                    response.send_internal_error()

    return KeepAliveRequestHandler


class _BufferedResponse:
    """Writer of one WSGI response on a keep-alive connection.

    A response whose headers carry ``Content-Length`` is streamed as the application
    yields it, which lets a fault rule send part of a body and then drop the
    connection. Any other response is buffered to compute its ``Content-Length``.
    """

    def __init__(self, handler: Any) -> None:
        self._handler = handler
        self._status: str | None = None
        self._headers: list[tuple[str, str]] = []
        self._buffer: list[bytes] = []
        self.headers_sent = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and self.headers_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self._status, self._headers = status, list(headers)
        return self.write

    @property
    def _has_length(self) -> bool:
        return any(name.lower() == "content-length" for name, _ in self._headers)

    def write(self, data: bytes) -> None:
        if not self._has_length:
            self._buffer.append(data)
            return
        if not self.headers_sent:
            self._send_headers()
        if data:
            self._handler.wfile.write(data)
        self._handler.wfile.flush()

    def finish(self) -> None:
        if self.headers_sent:
            return
        payload = b"".join(self._buffer)
        if not self._has_length and self._handler.command != "HEAD":
            self._headers.append(("Content-Length", str(len(payload))))
        self._send_headers()
        if payload and self._handler.command != "HEAD":
            self._handler.wfile.write(payload)
        self._handler.wfile.flush()

    def send_internal_error(self) -> None:
        payload = b"Internal Server Error"
        self._status = "500 Internal Server Error"
        self._headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(payload)))]
        self._send_headers()
        self._handler.wfile.write(payload)
        self._handler.wfile.flush()

    def _send_headers(self) -> None:
        if self._status is None:
            raise RuntimeError("the WSGI application wrote a body before calling start_response")
        code, _, reason = self._status.partition(" ")
        self._handler.send_response(int(code), reason)
        for name, value in self._headers:
            if name.lower() != "connection":
                self._handler.send_header(name, value)
        if self._handler.close_connection:
            self._handler.send_header("Connection", "close")
        self._handler.end_headers()
        self.headers_sent = True


class _S3ServerClientHelpers:
    """Client-side helpers shared by the in-thread and the child-process server."""

    endpoint_url: str

    def _control(self, operation: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    # -- control API -------------------------------------------------------------------

    def set_get_latency(self, seconds: float) -> None:
        """Set the delay added before the response to each object GET."""
        self._control("set_get_latency", seconds=seconds)

    def fail_object_gets(
        self,
        key: str,
        *,
        status: int = 503,
        code: str | None = None,
        times: int | None = None,
        bucket: str | None = None,
    ) -> None:
        """Respond to GETs of ``key`` with an S3 error; see :meth:`S3TestMiddleware.fail_object_gets`."""
        self._control("fail_object_gets", key=key, status=status, code=code, times=times, bucket=bucket)

    def drop_object_gets(
        self, key: str, *, after_bytes: int | None = None, times: int | None = None, bucket: str | None = None
    ) -> None:
        """Drop the connection mid-body on GETs of ``key``; see :meth:`S3TestMiddleware.drop_object_gets`."""
        self._control("drop_object_gets", key=key, after_bytes=after_bytes, times=times, bucket=bucket)

    def clear_faults(self) -> None:
        """Remove all fault rules."""
        self._control("clear_faults")

    def pause_object_gets(self) -> None:
        """Hold arriving object GETs until :meth:`resume_object_gets`."""
        self._control("pause_object_gets")

    def resume_object_gets(self) -> None:
        """Release held object GETs."""
        self._control("resume_object_gets")

    def reset_counters(self) -> None:
        """Zero all counters."""
        self._control("reset_counters")

    def stats(self) -> S3ServerStats:
        """Return a snapshot of the counters since the last reset."""
        return self._control("stats")

    def wait_for_object_gets_in_flight(self, count: int, timeout: float = 30.0) -> S3ServerStats:
        """Wait until at least ``count`` object GETs are in flight, e.g. held by a pause.

        :raises TimeoutError: if fewer than ``count`` are in flight after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats.object_gets_in_flight >= count:
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {stats.object_gets_in_flight} of {count} object GETs were in flight after {timeout} s"
                )
            time.sleep(0.01)

    # -- S3 clients --------------------------------------------------------------------

    def storage_options(self) -> dict[str, Any]:
        """Return fsspec storage options that point s3fs at this server."""
        return {
            "key": TEST_ACCESS_KEY_ID,
            "secret": TEST_SECRET_ACCESS_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": TEST_REGION},
        }

    def s3fs_filesystem(self, max_pool_connections: int | None = None, **kwargs: Any) -> s3fs.S3FileSystem:
        """Create a new :class:`s3fs.S3FileSystem` (not from the instance cache) for this server.

        :param max_pool_connections: size of aiobotocore's connection pool; ``None``
            keeps aiobotocore's default (10).
        :param kwargs: further ``S3FileSystem`` arguments.
        """
        import s3fs

        options: dict[str, Any] = {**self.storage_options(), "skip_instance_cache": True, **kwargs}
        if max_pool_connections is not None:
            options["config_kwargs"] = {
                **options.get("config_kwargs", {}),
                "max_pool_connections": max_pool_connections,
            }
        return s3fs.S3FileSystem(**options)

    def boto3_client(self, max_pool_connections: int = 10, max_attempts: int = 3) -> Any:
        """Create a boto3 S3 client for this server with the dummy credentials.

        :param max_attempts: total attempts per call, including retries, in botocore's
            ``standard`` retry mode; 1 disables retries.
        """
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=TEST_ACCESS_KEY_ID,
            aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
            region_name=TEST_REGION,
        )
        config = Config(
            max_pool_connections=max_pool_connections,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket, by default with a unique name, and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.boto3_client().create_bucket(Bucket=name)
        return name

    def put_objects(
        self, bucket: str, objects: Mapping[str, bytes], prefix: str = "", workers: int = 8
    ) -> None:
        """Upload ``objects`` (key relative to ``prefix`` -> content) with parallel PUTs.

        :param prefix: prepended to every key as is, so end it with ``/`` for a folder.
        """
        client = self.boto3_client(max_pool_connections=workers)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(client.put_object, Bucket=bucket, Key=prefix + key, Body=body)
                for key, body in objects.items()
            ]
            for future in concurrent.futures.as_completed(futures):
                future.result()


class S3TestServer(_S3ServerClientHelpers):
    """moto S3 server on 127.0.0.1 in a thread of this process, with latency and faults.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. The control
    methods act on :attr:`middleware` directly.

    :param host: address to bind; keep the loopback address.
    :param port: TCP port; 0 lets the OS pick a free one.
    :param get_latency_seconds: delay added before the response to each object GET.
    :param keep_alive: keep HTTP/1.1 connections open between requests, as S3 does;
        ``False`` uses werkzeug's own handler, which closes every connection.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        get_latency_seconds: float = 0.0,
        keep_alive: bool = True,
    ) -> None:
        self._host = host
        self._port = port
        self._initial_latency = get_latency_seconds
        self._keep_alive = keep_alive
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.middleware: S3TestMiddleware | None = None

    @property
    def endpoint_url(self) -> str:  # type: ignore[override]
        """``http://127.0.0.1:PORT`` of the running server."""
        if self._server is None:
            raise RuntimeError("S3TestServer is not running; call start() or use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3TestServer:
        """Bind the port and serve requests in a daemon thread."""
        if self._server is not None:
            raise RuntimeError(f"S3TestServer is already running at {self.endpoint_url}")
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.middleware = S3TestMiddleware(
            DomainDispatcherApplication(create_backend_app), self._initial_latency
        )
        self._server = make_server(
            self._host,
            self._port,
            self.middleware,
            threaded=True,
            request_handler=_request_handler_class(self._keep_alive),
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"s3-test-server-{self._server.server_port}", daemon=True
        )
        self._thread.start()
        log.info("S3 test server started endpoint=%s", self.endpoint_url)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is None:
            return
        if self.middleware is not None:
            self.middleware.resume_object_gets()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        log.info("S3 test server stopped port=%s", self._server.server_port)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _control(self, operation: str, **kwargs: Any) -> Any:
        if self.middleware is None:
            raise RuntimeError("S3TestServer is not running; call start() first")
        return getattr(self.middleware, operation)(**kwargs)


class S3TestServerProcess(_S3ServerClientHelpers):
    """The same server in a child Python process, driven over its HTTP control path.

    Running moto in its own process keeps its CPU time and GIL away from the client
    being measured, and :attr:`S3ServerStats.process_cpu_seconds` is then the
    server's CPU alone.

    :param get_latency_seconds: delay added before the response to each object GET.
    :param keep_alive: keep HTTP/1.1 connections open between requests, as S3 does.
    :param start_timeout: seconds to wait for the child to print its endpoint.
    """

    def __init__(
        self, get_latency_seconds: float = 0.0, keep_alive: bool = True, start_timeout: float = 60.0
    ) -> None:
        self._initial_latency = get_latency_seconds
        self._keep_alive = keep_alive
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[str] | None = None
        self._endpoint_url: str | None = None
        # Control requests go to 127.0.0.1 only, so bypass any proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def endpoint_url(self) -> str:  # type: ignore[override]
        if self._endpoint_url is None:
            raise RuntimeError("S3TestServerProcess is not running; call start() first")
        return self._endpoint_url

    @property
    def pid(self) -> int:
        """Process id of the child that runs the server."""
        if self._process is None:
            raise RuntimeError("S3TestServerProcess is not running; call start() first")
        return self._process.pid

    def start(self) -> S3TestServerProcess:
        """Start the child process and wait until it serves requests."""
        if self._process is not None:
            raise RuntimeError(f"S3TestServerProcess is already running at {self._endpoint_url}")
        repo_root = Path(__file__).resolve().parents[2]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])),
        }
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.s3_server",
                "--get-latency-ms",
                str(self._initial_latency * 1000),
                *([] if self._keep_alive else ["--no-keep-alive"]),
            ],
            cwd=repo_root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._read_first_line()
        try:
            self._endpoint_url = json.loads(line)["endpoint_url"]
        except (ValueError, KeyError) as err:
            self.stop()
            raise RuntimeError(f"S3 test server process printed {line!r} instead of its endpoint") from err
        return self

    def _read_first_line(self) -> str:
        assert self._process is not None and self._process.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self._process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self._start_timeout)
        if not lines or not lines[0]:
            self.stop()
            raise RuntimeError(
                f"S3 test server process did not print its endpoint within {self._start_timeout} s; "
                "run `python -m tests.support.s3_server` from the repository root to see its error"
            )
        return lines[0]

    def stop(self) -> None:
        """Close the child's stdin, which makes it shut down, and wait for it to exit."""
        process, self._process, self._endpoint_url = self._process, None, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _control(self, operation: str, **kwargs: Any) -> Any:
        request = urllib.request.Request(
            f"{self.endpoint_url}{CONTROL_PATH_PREFIX}{operation}",
            data=json.dumps(kwargs).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with self._opener.open(request, timeout=30) as response:
                result = json.load(response)["result"]
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise ValueError(f"S3 test server rejected control operation {operation}: {detail}") from err
        if operation == "stats":
            return S3ServerStats(**result)
        return result


@dataclasses.dataclass(frozen=True)
class S3Bucket:
    """A bucket on a test server, as handed to tests by the ``s3_bucket`` fixture."""

    server: S3TestServer | S3TestServerProcess
    name: str

    def url(self, prefix: str = "") -> str:
        """Return the ``s3://`` URL of ``prefix`` in this bucket."""
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    def put_objects(self, objects: Mapping[str, bytes], prefix: str = "") -> None:
        """Upload ``objects`` (key relative to ``prefix`` -> content) into this bucket."""
        self.server.put_objects(self.name, objects, prefix=prefix)


def main(argv: list[str] | None = None) -> None:
    """Run the server until stdin reaches end of file or the process gets SIGTERM.

    The first line on stdout is a JSON object with ``endpoint_url``.
    """
    parser = argparse.ArgumentParser(
        description="moto S3 server with GET latency, counters and fault injection"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--get-latency-ms",
        type=float,
        default=0.0,
        help="delay added before each object GET, in milliseconds",
    )
    parser.add_argument(
        "--no-keep-alive",
        action="store_true",
        help="close the connection after every response, as werkzeug's own request handler does",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="s3-test-server %(levelname)s %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def wait_for_stdin_eof() -> None:
        # The parent keeps our stdin open, so end of file means that the parent has exited.
        sys.stdin.read()
        stop.set()

    server = S3TestServer(
        args.host,
        args.port,
        get_latency_seconds=args.get_latency_ms / 1000,
        keep_alive=not args.no_keep_alive,
    )
    with server:
        print(json.dumps({"endpoint_url": server.endpoint_url}), flush=True)
        threading.Thread(target=wait_for_stdin_eof, daemon=True).start()
        stop.wait()


if __name__ == "__main__":
    main()
