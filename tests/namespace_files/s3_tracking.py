"""Per-bucket counts of object GETs in flight on the S3 test server.

:class:`S3TestMiddleware` counts object GETs in flight for the whole server. A test of the
host-wide download budget also needs the count per client process. Each process in those tests
stages its own bucket, so :class:`BucketGetTracker` counts per bucket.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote

from tests.support.s3_server import S3TestServer

# Query parameters that keep a GET on /bucket/key a GetObject call; any other one selects a
# sub-resource such as ?tagging or ?acl.
_OBJECT_GET_QUERY_KEYS = frozenset({"versionId", "partNumber", "x-id"})
_OBJECT_GET_QUERY_PREFIXES = ("response-", "X-Amz-")


def _split_request(environ: dict[str, Any]) -> tuple[str, str, bool]:
    """Return the bucket, the key and whether the request is an object GET (path-style URLs)."""
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
    path, _, query = raw_uri.partition("?")
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    object_get = (
        environ["REQUEST_METHOD"] == "GET"
        and bool(bucket)
        and bool(key)
        and all(
            name in _OBJECT_GET_QUERY_KEYS or name.startswith(_OBJECT_GET_QUERY_PREFIXES)
            for name, _ in parse_qsl(query, keep_blank_values=True)
        )
    )
    return bucket, key, object_get


class _TrackedBody:
    """Response iterable that runs ``on_done`` before it hands the body to the server.

    The whole body is read from the inner application first. A client can only send its next
    GET after it has received the whole body, so ending the count before the bytes leave keeps
    a finished GET from overlapping the client's next one. Object bodies of the S3 test server
    are one buffered chunk, so reading ahead costs no extra memory.

    NOTE: a body that the inner server cuts short with a dropped connection is cut before its
    first byte here instead of in the middle. Tests that inject dropped connections should use
    the plain server.
    """

    def __init__(self, inner: Iterable[bytes], on_done: Callable[[], None]) -> None:
        self._inner = inner
        self._on_done: Callable[[], None] | None = on_done

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def __iter__(self) -> Iterator[bytes]:
        chunks: list[bytes] = []
        error: BaseException | None = None
        try:
            chunks.extend(self._inner)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the count has ended
            error = err
        self._done()
        yield from chunks
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            close_inner = getattr(self._inner, "close", None)
            if close_inner is not None:
                close_inner()
        finally:
            self._done()


class BucketGetTracker:
    """WSGI middleware that counts object GETs in flight per bucket, and their maximum.

    A GET is in flight from its arrival, before any latency or pause of the wrapped server,
    until just before its body is handed to the socket. All methods are thread-safe.

    :param app: the WSGI application to wrap, normally :class:`S3TestMiddleware`.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._generation = 0
        self._in_flight: Counter[str] = Counter()
        self._max_in_flight: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()

    def reset(self) -> None:
        """Zero every count; GETs in flight now still finish but are no longer counted."""
        with self._lock:
            self._generation += 1
            self._in_flight.clear()
            self._max_in_flight.clear()
            self._requests.clear()

    def max_in_flight_by_bucket(self) -> dict[str, int]:
        """Return the maximum number of object GETs in flight at once, per bucket."""
        with self._lock:
            return dict(self._max_in_flight)

    def requests_by_bucket(self) -> dict[str, int]:
        """Return the number of requests of any kind received per bucket."""
        with self._lock:
            return dict(self._requests)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        bucket, _, object_get = _split_request(environ)
        with self._lock:
            generation = self._generation
            if bucket and not bucket.startswith("_"):  # The control API's path starts with '_'.
                self._requests[bucket] += 1
            if object_get:
                self._in_flight[bucket] += 1
                self._max_in_flight[bucket] = max(self._max_in_flight[bucket], self._in_flight[bucket])
        if not object_get:
            return self._app(environ, start_response)

        def ended() -> None:
            with self._lock:
                if generation == self._generation:
                    self._in_flight[bucket] -= 1

        try:
            body = self._app(environ, start_response)
        except BaseException:
            ended()
            raise
        return _TrackedBody(body, ended)


class TrackingS3Server(S3TestServer):
    """:class:`S3TestServer` with a :class:`BucketGetTracker` in front of its middleware."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracker: BucketGetTracker | None = None

    def start(self) -> TrackingS3Server:
        super().start()
        # NOTE: S3TestServer exposes no hook to wrap its WSGI application, so this replaces the
        # application of its werkzeug server, before any client knows the port.
        server = self._server
        assert server is not None
        self.tracker = BucketGetTracker(server.app)
        server.app = self.tracker
        return self

    def reset_all_counters(self) -> None:
        """Zero the counters of the server and of the per-bucket tracker."""
        assert self.tracker is not None
        self.reset_counters()
        self.tracker.reset()
