"""
Transfer: the parallel download engine of namespace-file staging.

Each download holds one slot of the host-wide budget (:mod:`.budget`) while its request is in flight,
and a staging runs at most ``task_cap`` downloads at once. Async fsspec filesystems (s3fs, gcsfs,
http) run on their own event loop with a sliding window of ``task_cap`` coroutines: a new transfer
starts as soon as one ends, instead of waiting for a whole batch as ``fs.get`` does. Sync ones
(local, sftp) run in a thread pool of ``task_cap`` threads.

Every file is written to a temporary name in its destination folder (or in the cache, see
:mod:`.cache`) and renamed when complete, so an interrupted or failed staging never leaves a partial
file under a final name. Transient errors
(throttling, connection reset, timeouts, 5xx) are retried with exponential backoff and full jitter;
the first permanent error cancels the remaining transfers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import random
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kestra_perf_provider.exceptions import FileConflictError, StagingError
from kestra_perf_provider.namespace_files import s3_presigned
from kestra_perf_provider.namespace_files.cache import expected_md5

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from kestra_perf_provider.namespace_files.budget import HostBudget
    from kestra_perf_provider.namespace_files.cache import NamespaceCache

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".part"

# S3 and GCS error codes that mean "try again later" rather than "this request is wrong".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
        "429",
    }
)
# Connection-level failures of botocore, aiohttp and the standard library, matched by class name so
# that neither client library is a hard dependency.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "HTTPClientError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "ResponseParserError",
        "ClientPayloadError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ServerTimeoutError",
        "IncompleteRead",
        "FSTimeoutError",
        "IncompleteDownloadError",
    }
)
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class IncompleteDownloadError(OSError):
    """A download ended with fewer or more bytes than the listing reported."""


def is_transient(error: BaseException) -> bool:
    """
    Tell whether a download error is worth retrying.

    s3fs turns botocore's ``ClientError`` into ``OSError`` and keeps the original as ``__cause__``,
    so the whole cause chain is inspected. Service codes are compared as strings because botocore
    reports HTTP statuses as ``'503'``.
    """
    if isinstance(error, _PERMANENT_TYPES):
        return False
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(current).__mro__):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or status == 429 or (isinstance(status, int) and status >= 500):
                return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter between the tries of one file."""

    max_retries: int = 4
    initial_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, retry: int) -> float:
        """Return the random sleep before retry number ``retry`` (1-based), in seconds."""
        return random.uniform(0, min(self.max_delay, self.initial_delay * 2 ** (retry - 1)))


@dataclass(frozen=True)
class TransferJob:
    """One file to stage: source path on ``fs``, final local path, and its cache key if cacheable."""

    fs: AbstractFileSystem
    source_path: str
    destination: Path
    size: int | None
    description: str  # names the file and its namespace in errors
    cache_key: str | None = None
    identity: str | None = None


@dataclass
class TransferStats:
    """Counters of one run of the engine."""

    files: int = 0  # placed into the working directory
    bytes: int = 0
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    cached_files: int = 0  # placed from the cache without a request
    retries: int = 0
    peak_in_flight: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def ended(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def completed(self, size: int, *, downloaded: bool) -> None:
        with self._lock:
            self.files += 1
            self.bytes += size
            if downloaded:
                self.downloaded_files += 1
                self.downloaded_bytes += size
            else:
                self.cached_files += 1

    def retried(self) -> None:
        with self._lock:
            self.retries += 1


def temporary_path(destination: Path) -> Path:
    """Return a fresh hidden name beside ``destination`` for its download in progress."""
    return destination.parent / f".nsf-{uuid.uuid4().hex[:16]}{TEMP_SUFFIX}"


def _check_size(temporary: Path, job: TransferJob) -> Path:
    size = os.path.getsize(temporary)
    if job.size is not None and size != job.size:
        raise IncompleteDownloadError(f"received {size} bytes, the listing reported {job.size}")
    return temporary


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _failure(job: TransferJob, error: BaseException, tries: int) -> StagingError:
    kind = "transient" if is_transient(error) else "permanent"
    return StagingError(
        f"Failed to download {job.description} after {tries} tr{'y' if tries == 1 else 'ies'} "
        f"({kind} error): {type(error).__name__}: {error}"
    )


class _DownloadTarget:
    """Temporary location and completion step of one job's download: the cache or the destination."""

    def __init__(self, job: TransferJob, cache: NamespaceCache | None) -> None:
        self.job = job
        self.cache = cache if job.cache_key is not None else None
        self.placed = False  # whether the download itself also filled the destination

    def temporary(self) -> Path:
        if self.cache is not None:
            return self.cache.temporary_path(self.job.cache_key)  # type: ignore[arg-type]
        return temporary_path(self.job.destination)

    def mirror(self) -> Path | None:
        """Return a second temporary file for the destination when the download goes to the cache."""
        if self.cache is None or self.cache.placement == "hardlink":
            return None  # A hard link to the new entry costs less than writing the bytes twice.
        return temporary_path(self.job.destination)

    def finish(self, temporary: Path, mirror: Path | None = None, digest: str | None = None) -> Path:
        """
        Check a complete download and move it to its final place: the cache or the destination.

        A ``mirror`` written during the download becomes the destination, which saves copying
        the new cache entry back out.
        """
        _check_size(temporary, self.job)
        if self.cache is None:
            os.replace(temporary, self.job.destination)
            return self.job.destination
        key: str = self.job.cache_key  # type: ignore[assignment]
        entry = self.cache.commit(key, temporary, expected_md5(self.job.identity), digest)
        if mirror is not None:
            os.replace(mirror, self.job.destination)
            self.placed = True
        return entry


def run_transfers(
    jobs: Sequence[TransferJob],
    *,
    budget: HostBudget,
    task_cap: int,
    retry: RetryPolicy,
    cache: NamespaceCache | None = None,
    presigned_s3: bool = True,
    stats: TransferStats | None = None,
) -> TransferStats:
    """
    Stage every job, at most ``task_cap`` at once, each holding a host budget slot while in flight.

    Jobs with a cache key go through ``cache``: a valid entry is placed without a request, and a
    missing one is downloaded once into the cache while other processes wanting it wait for the
    key's lock, holding no budget slot. Jobs are grouped by filesystem instance and the groups run
    one after another, so the cap holds for the whole staging.

    :param presigned_s3: download from S3 through presigned URLs where the filesystem allows it
        (:mod:`.s3_presigned`).
    :raises StagingError: a file failed with a permanent error or ran out of retries; the other
        transfers were cancelled and their temporary files removed.
    """
    stats = stats or TransferStats()
    for parent in {os.path.dirname(job.destination) for job in jobs}:
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise FileConflictError(
                f"Cannot create folder {parent} for namespace files: {err.filename} is an existing "
                "file. Remove it, or exclude the files below it."
            ) from err
    if cache is not None:
        jobs = [job for job in jobs if not _place_cached(job, cache, stats)]
    groups: dict[int, list[TransferJob]] = {}
    for job in jobs:
        groups.setdefault(id(job.fs), []).append(job)
    for group in groups.values():
        fs = group[0].fs
        if getattr(fs, "async_impl", False) and hasattr(fs, "_get_file"):
            direct = presigned_s3 and s3_presigned.supports(fs)
            _run_on_loop(fs, _download_async(group, budget, task_cap, retry, cache, direct, stats))
        else:
            _download_threaded(group, budget, task_cap, retry, cache, stats)
    return stats


def _place_cached(job: TransferJob, cache: NamespaceCache, stats: TransferStats) -> bool:
    """
    Place a job's file from a valid cache entry if its lock is free right now; tell whether it did.

    Hits are served here, in the calling thread, before any download starts: a fully cached
    staging then costs its listing plus one lock, stat and copy per file, with no event loop hop.
    Everything else (misses, and keys another task holds) goes to the engine.
    """
    if job.cache_key is None:
        return False
    lock = cache.try_lock(job.cache_key)
    if lock is None:
        return False
    try:
        entry = cache.valid_entry(job.cache_key, job.size)
        if entry is None:
            return False
        stats.completed(cache.place(entry, job.destination, job.cache_key), downloaded=False)
        return True
    finally:
        lock.release()


def _run_on_loop(fs: AbstractFileSystem, coroutine: Any) -> None:
    """
    Run a coroutine on the filesystem's event loop thread and wait for it.

    Unlike ``fsspec.asyn.sync``, an exception raised in the waiting thread (Airflow's SIGTERM handler
    raising on task termination, KeyboardInterrupt) cancels the coroutine and waits for its cleanup,
    so no download keeps writing or renaming after the task gave up.
    """
    future = asyncio.run_coroutine_threadsafe(coroutine, fs.loop)
    try:
        future.result()
    except BaseException:
        future.cancel()
        try:
            future.result(timeout=30)
        except BaseException:  # The coroutine's own outcome is secondary to the original error.
            pass
        raise


def _get_file_kwargs(fs: AbstractFileSystem) -> dict[str, Any]:
    # One request per file keeps "downloads in flight" equal to requests in flight; s3fs would
    # otherwise fetch large files in concurrent ranged parts outside the budget.
    try:
        parameters = inspect.signature(fs._get_file).parameters
    except (TypeError, ValueError):
        return {}
    return {"max_concurrency": 1} if "max_concurrency" in parameters else {}


# Files up to this size are placed from the cache on the event loop thread: a thread hand-off
# would cost more than the copy.
_INLINE_PLACEMENT_BYTES = 1 << 20


async def _download_async(
    jobs: Sequence[TransferJob],
    budget: HostBudget,
    task_cap: int,
    retry: RetryPolicy,
    cache: NamespaceCache | None,
    direct: bool,
    stats: TransferStats,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        # File creation and renames run here, so the event loop thread only sends and receives.
        io_pool = stack.enter_context(
            concurrent.futures.ThreadPoolExecutor(max_workers=min(8, task_cap), thread_name_prefix="nsf-io")
        )
        getter = None
        if direct:
            getter = await stack.enter_async_context(
                s3_presigned.PresignedGetter(jobs[0].fs, task_cap, io_pool=io_pool)
            )
        await _download_window(jobs, budget, task_cap, retry, cache, getter, io_pool, stats)


async def _download_window(
    jobs: Sequence[TransferJob],
    budget: HostBudget,
    task_cap: int,
    retry: RetryPolicy,
    cache: NamespaceCache | None,
    getter: s3_presigned.PresignedGetter | None,
    io_pool: concurrent.futures.Executor,
    stats: TransferStats,
) -> None:
    kwargs = _get_file_kwargs(jobs[0].fs)
    loop = asyncio.get_running_loop()

    async def fetch(target: _DownloadTarget) -> Path:
        job = target.job
        tries = 0
        while True:
            tries += 1
            temporary = target.temporary()
            mirror = target.mirror() if getter is not None else None
            digest = None
            try:
                async with await budget.acquire_async():
                    stats.started()
                    try:
                        if getter is not None:
                            digest = await getter.get_file(job.source_path, str(temporary), mirror=mirror)
                        else:
                            await job.fs._get_file(job.source_path, str(temporary), **kwargs)
                    finally:
                        stats.ended()
                return await s3_presigned.run_in_thread(io_pool, target.finish, temporary, mirror, digest)
            except asyncio.CancelledError:
                _unlink_quietly(temporary)
                if mirror is not None:
                    _unlink_quietly(mirror)
                raise
            except Exception as error:
                _unlink_quietly(temporary)
                if mirror is not None:
                    _unlink_quietly(mirror)
                if not is_transient(error) or tries > retry.max_retries:
                    raise _failure(job, error, tries) from error
                stats.retried()
                log.debug("Retrying %s after %s: %s", job.description, type(error).__name__, error)
                await asyncio.sleep(retry.delay(tries))

    async def stage(job: TransferJob) -> None:
        target = _DownloadTarget(job, cache)
        if target.cache is None:
            await fetch(target)
            stats.completed(job.destination.stat().st_size, downloaded=True)
            return
        key = job.cache_key
        lock = await target.cache.lock_async(key)  # type: ignore[arg-type]
        try:
            entry = target.cache.valid_entry(key, job.size)  # type: ignore[arg-type]
            downloaded = entry is None
            if entry is None:
                entry = await fetch(target)
                if target.placed:
                    stats.completed(job.destination.stat().st_size, downloaded=True)
                    return
            if (job.size or 0) <= _INLINE_PLACEMENT_BYTES:
                size = target.cache.place(entry, job.destination, key)  # type: ignore[arg-type]
            else:
                size = await loop.run_in_executor(None, target.cache.place, entry, job.destination, key)
            stats.completed(size, downloaded=downloaded)
        finally:
            lock.release()

    pending: Iterator[TransferJob] = iter(jobs)

    async def worker() -> None:
        # Each worker takes the next job the moment its previous one ends, so ``task_cap``
        # transfers stay in flight without a scheduler loop between them.
        for job in pending:
            await stage(job)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(task_cap, len(jobs))):
                group.create_task(worker())
    except BaseExceptionGroup as failures:
        # The group cancelled the other workers at the first failure; report that failure with
        # its own cause (the storage error) rather than the group.
        first = failures.exceptions[0]
        raise first from first.__cause__


def _download_threaded(
    jobs: Sequence[TransferJob],
    budget: HostBudget,
    task_cap: int,
    retry: RetryPolicy,
    cache: NamespaceCache | None,
    stats: TransferStats,
) -> None:
    cancelled = threading.Event()

    def fetch(target: _DownloadTarget) -> Path | None:
        job = target.job
        tries = 0
        while not cancelled.is_set():
            tries += 1
            temporary = target.temporary()
            try:
                with budget.acquire():
                    stats.started()
                    try:
                        job.fs.get_file(job.source_path, str(temporary))
                    finally:
                        stats.ended()
                if cancelled.is_set():
                    _unlink_quietly(temporary)
                    return None
                return target.finish(temporary)
            except Exception as error:
                _unlink_quietly(temporary)
                if not is_transient(error) or tries > retry.max_retries:
                    raise _failure(job, error, tries) from error
                stats.retried()
                log.debug("Retrying %s after %s: %s", job.description, type(error).__name__, error)
                cancelled.wait(retry.delay(tries))
        return None

    def stage(job: TransferJob) -> None:
        target = _DownloadTarget(job, cache)
        if target.cache is None:
            if fetch(target) is not None:
                stats.completed(job.destination.stat().st_size, downloaded=True)
            return
        key: str = job.cache_key  # type: ignore[assignment]
        with target.cache.locked(key):
            entry = target.cache.valid_entry(key, job.size)
            downloaded = entry is None
            if entry is None:
                entry = fetch(target)
                if entry is None:
                    return
            stats.completed(target.cache.place(entry, job.destination, key), downloaded=downloaded)

    _run_in_threads(jobs, stage, task_cap, cancelled)


def _run_in_threads(
    jobs: Sequence[TransferJob], stage: Callable[[TransferJob], None], task_cap: int, cancelled: threading.Event
) -> None:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=task_cap, thread_name_prefix="nsf-get")
    try:
        futures = [executor.submit(stage, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except BaseException:
        cancelled.set()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
