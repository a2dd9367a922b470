"""
Staging: list the namespaces, plan, download in parallel, and report one summary.

:func:`stage_namespace_files` is the entry point shared by the operator mixin, the ``@task``
decorator and direct callers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from kestra_perf_provider.namespace_files.budget import HostBudget
from kestra_perf_provider.namespace_files.cache import NamespaceCache, cache_key
from kestra_perf_provider.namespace_files.planning import IfExists, PathFilter, build_plan
from kestra_perf_provider.namespace_files.settings import NamespaceFilesSettings, load_settings
from kestra_perf_provider.namespace_files.sources import (
    Namespace,
    check_folders,
    coerce_namespaces,
    list_namespace,
    open_filesystem,
)
from kestra_perf_provider.namespace_files.transfer import RetryPolicy, TransferJob, run_transfers

log = logging.getLogger(__name__)

METRIC_PREFIX = "namespace_files"


@dataclass(frozen=True)
class StagingResult:
    """Summary of one staging."""

    directory: Path
    files: int  # placed into the working directory, downloaded or from the cache
    bytes: int
    downloaded_files: int
    downloaded_bytes: int
    cached_files: int  # placed from the host cache without a request
    namespaces: int
    listed: int  # files listed in all namespaces
    kept_existing: int  # left in place by if_exists=skip or warn
    overridden: int  # shadowed by a later namespace
    excluded: int  # filtered out by include/exclude
    retries: int
    peak_in_flight: int
    task_cap: int
    host_budget: int
    seconds: float


def stage_namespace_files(
    namespaces: Sequence[Namespace | str | dict[str, Any]] | Namespace | str,
    destination: str | os.PathLike[str],
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    if_exists: IfExists | str = IfExists.OVERWRITE,
    folder_per_namespace: bool = False,
    settings: NamespaceFilesSettings | None = None,
) -> StagingResult:
    """
    Stage the files of one or more namespaces into ``destination``.

    :param namespaces: namespace roots in override order: a later namespace wins a relative path
        that an earlier one also has.
    :param destination: working directory to fill; created if missing.
    :param include: glob patterns of files to stage (default ``**``); see :mod:`.planning`.
    :param exclude: glob patterns of files to leave out.
    :param if_exists: ``overwrite``, ``skip``, ``warn`` or ``fail`` for files already present.
    :param folder_per_namespace: stage each namespace into a subfolder named after it.
    :param settings: resolved settings; read from ``[namespace_files]`` when omitted.
    """
    started = time.monotonic()
    settings = settings or load_settings()
    resolved = coerce_namespaces(namespaces)
    if folder_per_namespace:
        check_folders(resolved)
    path_filter = PathFilter(include, exclude)
    if_exists = IfExists.parse(if_exists)
    directory = Path(destination).absolute()

    task_cap = settings.task_parallel_downloads
    filesystems = [open_filesystem(namespace, max_connections=task_cap) for namespace in resolved]
    listings = [
        list_namespace(fs, namespace, index)
        for index, (fs, namespace) in enumerate(zip(filesystems, resolved, strict=True))
    ]
    plan = build_plan(
        listings,
        directory,
        path_filter=path_filter,
        if_exists=if_exists,
        folder_per_namespace=folder_per_namespace,
    )
    # Created only now, so a staging that fails while listing or planning leaves no folder behind.
    directory.mkdir(parents=True, exist_ok=True)
    cache = _open_cache(settings)
    jobs = [
        TransferJob(
            fs=filesystems[planned.source.namespace_index],
            source_path=planned.source.path,
            destination=planned.destination,
            size=planned.source.size,
            description=f"{planned.source.relative!r} from namespace {planned.source.namespace.url!r}",
            # A file larger than the whole cache would only evict everything else.
            cache_key=cache_key(planned.source)
            if cache is not None and (planned.source.size or 0) <= cache.max_size
            else None,
            identity=planned.source.identity,
        )
        for planned in plan.downloads
    ]
    budget = HostBudget(settings.budget_dir, settings.host_parallel_downloads)
    retry = RetryPolicy(settings.max_retries, settings.retry_initial_delay, settings.retry_max_delay)
    try:
        stats = run_transfers(
            jobs,
            budget=budget,
            task_cap=task_cap,
            retry=retry,
            cache=cache,
            presigned_s3=settings.s3_presigned_downloads,
        )
    finally:
        budget.close()
    if cache is not None and cache.stats.inserted:
        cache.evict()

    result = StagingResult(
        directory=directory,
        files=stats.files,
        bytes=stats.bytes,
        downloaded_files=stats.downloaded_files,
        downloaded_bytes=stats.downloaded_bytes,
        cached_files=stats.cached_files,
        namespaces=len(resolved),
        listed=sum(len(listing) for listing in listings),
        kept_existing=len(plan.kept_existing),
        overridden=plan.overridden,
        excluded=plan.excluded,
        retries=stats.retries,
        peak_in_flight=stats.peak_in_flight,
        task_cap=task_cap,
        host_budget=settings.host_parallel_downloads,
        seconds=time.monotonic() - started,
    )
    _report(result)
    return result


def _open_cache(settings: NamespaceFilesSettings) -> NamespaceCache | None:
    if not settings.cache_enabled:
        return None
    cache = NamespaceCache(settings.cache_dir, settings.cache_max_size, settings.cache_placement)
    removed = cache.remove_stale_temporary_files()
    if removed:
        log.info("Removed %d temporary files left in the namespace-file cache by killed tasks", removed)
    return cache


def _report(result: StagingResult) -> None:
    log.info(
        "Staged namespace files: files=%d bytes=%d from_cache=%d downloaded_files=%d downloaded_bytes=%d "
        "namespaces=%d seconds=%.3f peak_parallel_downloads=%d task_cap=%d host_budget=%d retries=%d "
        "kept_existing=%d overridden=%d excluded=%d directory=%s",
        result.files,
        result.bytes,
        result.cached_files,
        result.downloaded_files,
        result.downloaded_bytes,
        result.namespaces,
        result.seconds,
        result.peak_in_flight,
        result.task_cap,
        result.host_budget,
        result.retries,
        result.kept_existing,
        result.overridden,
        result.excluded,
        result.directory,
    )
    try:
        from airflow.sdk.observability.stats import Stats
    except ImportError:  # Metrics are optional outside an Airflow installation.
        return
    Stats.incr(f"{METRIC_PREFIX}.files", result.files)
    Stats.incr(f"{METRIC_PREFIX}.bytes", result.bytes)
    Stats.incr(f"{METRIC_PREFIX}.cache_hits", result.cached_files)
    Stats.incr(f"{METRIC_PREFIX}.downloaded_files", result.downloaded_files)
    Stats.incr(f"{METRIC_PREFIX}.downloaded_bytes", result.downloaded_bytes)
    Stats.incr(f"{METRIC_PREFIX}.retries", result.retries)
    Stats.timing(f"{METRIC_PREFIX}.duration", timedelta(seconds=result.seconds))
    Stats.gauge(f"{METRIC_PREFIX}.peak_parallel_downloads", result.peak_in_flight)
