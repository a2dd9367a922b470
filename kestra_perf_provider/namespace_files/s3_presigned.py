"""
Presigned S3 downloads: GetObject through one aiohttp session instead of botocore's full pipeline.

A ``GetObject`` call through s3fs runs botocore's whole request pipeline: parameter validation,
endpoint resolution, event hooks, signing, and response parsing that includes a ``dateutil`` parse
of ``LastModified``. That costs about 2 ms of client CPU per object (CPython 3.11, aiobotocore 3.10,
2-core VM, ``time.process_time`` around 200 ``_cat_file`` calls). On a 2-core worker this CPU, not
the network, bounds how many small files per second a task stages. Presigning the same
request with the filesystem's own client (same endpoint, region, addressing style and credentials)
and sending it with aiohttp costs about 0.2 ms for the signature plus 0.25 ms for the transfer.

The direct path is used only when the filesystem is a plain authenticated ``S3FileSystem``. Anything
that changes the request keeps s3fs's own ``_get_file``: requester pays, anonymous access, a custom
signer, or proxies in botocore's config. A response that asks for another region falls back to it
too, because botocore follows such redirects and a presigned URL cannot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import ssl
from contextlib import nullcontext
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

# Long enough for a large object queued behind a full window; the URL is used at once.
_URL_EXPIRY_SECONDS = 3600
_CHUNK_BYTES = 1 << 16
# Bodies up to this size are received whole and written by a thread; larger ones are streamed.
_IN_MEMORY_BYTES = 1 << 20
_REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"})
_ERROR_CODE = re.compile(rb"<Code>([^<]+)</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")


class S3ResponseError(OSError):
    """An S3 error response, with botocore's ``response`` layout so retry rules read it alike."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


def supports(fs: AbstractFileSystem) -> bool:
    """Tell whether ``fs`` is an authenticated s3fs filesystem whose requests a presigned URL reproduces."""
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return False
    if not isinstance(fs, S3FileSystem) or fs.anon or fs.req_kw:
        return False
    config = fs.config_kwargs or {}
    # botocore presigns with SigV2 in some regions, and buckets created since 2020 reject SigV2, so
    # only a client configured for SigV4 qualifies. open_filesystem() configures it by default.
    return not config.get("proxies") and config.get("signature_version") == "s3v4"


class PresignedGetter:
    """
    Downloads S3 objects of one filesystem through presigned URLs, at most ``connections`` at once.

    Use as an async context manager on the filesystem's event loop.
    """

    def __init__(self, fs: AbstractFileSystem, connections: int, io_pool: Executor | None = None) -> None:
        self.fs = fs
        self.connections = connections
        self.io_pool = io_pool
        self._session: Any = None

    async def __aenter__(self) -> PresignedGetter:
        import aiohttp

        client = await self.fs.set_session()
        verify = (self.fs.client_kwargs or {}).get("verify", True)
        ssl_option: Any = True
        if verify is False:
            ssl_option = False
        elif isinstance(verify, str):
            ssl_option = ssl.create_default_context(cafile=verify)
        self._client = client
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections, ssl=ssl_option),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60),
            auto_decompress=False,
            trust_env=True,  # Proxies from HTTP(S)_PROXY and NO_PROXY, as botocore honours them.
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def get_file(self, rpath: str, lpath: str, mirror: str | os.PathLike[str] | None = None) -> str:
        """
        Download ``rpath`` to ``lpath`` and return the content's MD5; raise OSError subclasses as s3fs would.

        :param mirror: a second file to write the same bytes to, so a download into a cache can
            fill the working directory too without reading the entry back.
        """
        bucket, key, version_id = self.fs.split_path(rpath)
        params = {"Bucket": bucket, "Key": key}
        if version_id:
            params["VersionId"] = version_id
        url = await self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=_URL_EXPIRY_SECONDS)
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status == 200:
                length = response.content_length
                if length is not None and length <= _IN_MEMORY_BYTES:
                    body = await response.read()
                    # Creating files blocks for a while on some filesystems; a thread keeps that
                    # off the event loop, which meanwhile starts other requests.
                    return await run_in_thread(self.io_pool, _write_body, body, lpath, mirror)
                digest = hashlib.md5(usedforsecurity=False)
                with open(lpath, "wb") as handle, (open(mirror, "wb") if mirror else nullcontext()) as copy:
                    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                        handle.write(chunk)
                        digest.update(chunk)
                        if copy is not None:
                            copy.write(chunk)
                return digest.hexdigest()
            body = await response.read()
        code, message = _parse_error(body, response.status)
        if code in _REGION_CODES or response.status in (301, 307):
            log.debug("Falling back to s3fs for %s after %s (%s)", rpath, response.status, code)
            await self.fs._get_file(rpath, lpath)
            if mirror:
                shutil.copyfile(lpath, mirror)
            with open(lpath, "rb") as handle:
                return hashlib.file_digest(handle, "md5").hexdigest()
        text = f"{rpath}: {code} ({response.status}): {message}"
        if response.status == 404:
            raise FileNotFoundError(text)
        if response.status == 403:
            raise PermissionError(text)
        raise S3ResponseError(text, response.status, code)


async def run_in_thread(pool: Executor | None, function: Callable[..., T], *args: Any) -> T:
    """
    Run ``function`` in ``pool`` and return its result; when cancelled, wait for it to end first.

    A plain ``run_in_executor`` returns at once on cancellation while the thread keeps going, so a
    caller's cleanup could run before the thread writes or renames the files it cleans up.
    """
    future = asyncio.get_running_loop().run_in_executor(pool, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _write_body(body: bytes, lpath: str, mirror: str | os.PathLike[str] | None) -> str:
    for path in (lpath, mirror) if mirror else (lpath,):
        with open(path, "wb") as handle:
            handle.write(body)
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def _parse_error(body: bytes, status: int) -> tuple[str, str]:
    code = _ERROR_CODE.search(body)
    message = _ERROR_MESSAGE.search(body)
    return (
        code.group(1).decode(errors="replace") if code else str(status),
        message.group(1).decode(errors="replace") if message else body[:200].decode(errors="replace"),
    )
