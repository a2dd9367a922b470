"""Fixtures that serve namespace files from a real moto S3 server over HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.support.s3_server import S3Bucket, S3TestServer

if TYPE_CHECKING:
    from collections.abc import Iterator


def _restore_defaults(server: S3TestServer) -> None:
    server.clear_faults()
    server.resume_object_gets()
    server.set_get_latency(0.0)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:
    """One moto S3 server on 127.0.0.1 for the whole session, on an OS-assigned port."""
    with S3TestServer() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3TestServer) -> Iterator[S3Bucket]:
    """A new, empty bucket with a unique name on a server with no latency, no faults and zeroed counters.

    The server is ``s3_bucket.server``. Faults, pauses and latency that a test sets
    are removed again afterwards, so they cannot leak into the next test.
    """
    _restore_defaults(s3_server)
    bucket = S3Bucket(server=s3_server, name=s3_server.create_bucket())
    s3_server.reset_counters()
    yield bucket
    _restore_defaults(s3_server)
