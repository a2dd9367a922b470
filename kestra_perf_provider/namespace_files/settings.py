"""
Settings of namespace-file staging: the ``[namespace_files]`` section of ``airflow.cfg``.

:data:`CONFIG_SECTION` declares every option once. ``get_provider_info()`` publishes it, so
``airflow config list --section namespace_files`` shows the options with their defaults, and
:func:`load_settings` reads its defaults from the same table, so a task process that has not loaded
provider configuration still resolves the same values. Each value is resolved in one place: an
explicit argument, then ``airflow.cfg`` or its ``AIRFLOW__NAMESPACE_FILES__*`` variable, then the
derived default.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kestra_perf_provider.config import ConfigSection

SECTION = "namespace_files"

CONFIG_SECTION: dict[str, Any] = {
    "description": "Staging of namespace files (object-storage prefixes) into task working directories.",
    "options": {
        "host_parallel_downloads": {
            "description": (
                "Host-wide budget of parallel downloads, shared by every task process on a worker host. "
                "When unset: max(32, 4 x usable CPU cores), where usable cores honour CPU affinity and a "
                "cgroup CPU quota."
            ),
            "version_added": "0.1.0",
            "type": "integer",
            "example": "64",
            "default": None,
        },
        "task_parallel_downloads": {
            "description": (
                "Per-task cap on parallel downloads: a fraction of the host budget written with a decimal "
                "point (0.5 means half of it), or a whole number of downloads (8). Never above the host "
                "budget."
            ),
            "version_added": "0.1.0",
            "type": "string",
            "example": "8",
            "default": "0.5",
        },
        "budget_dir": {
            "description": (
                "Folder of the lock files that implement the host-wide budget. Every task process on a "
                "host must see the same local folder. When unset: a per-user folder under the system "
                "temporary directory."
            ),
            "version_added": "0.1.0",
            "type": "string",
            "example": "/var/run/airflow/namespace-files-budget",
            "default": None,
        },
        "max_retries": {
            "description": (
                "Retries of one file after a transient error (throttling, connection reset, timeout, "
                "5xx), with exponential backoff and full jitter. 0 disables retries."
            ),
            "version_added": "0.1.0",
            "type": "integer",
            "example": "8",
            "default": "6",
        },
        "retry_initial_delay": {
            "description": "Upper bound of the first retry's random delay, in seconds; it doubles per retry.",
            "version_added": "0.1.0",
            "type": "float",
            "example": "0.5",
            "default": "0.2",
        },
        "retry_max_delay": {
            "description": "Largest delay between two tries of one file, in seconds.",
            "version_added": "0.1.0",
            "type": "float",
            "example": "30",
            "default": "10",
        },
        "cache_enabled": {
            "description": (
                "Keep a content cache of namespace files on each worker host, so a file whose "
                "version is unchanged since an earlier staging is placed without a download."
            ),
            "version_added": "0.1.0",
            "type": "boolean",
            "example": "False",
            "default": "True",
        },
        "cache_dir": {
            "description": (
                "Folder of the host's namespace-file cache, shared by every task process on the host. "
                "When unset: a per-user folder under the system temporary directory."
            ),
            "version_added": "0.1.0",
            "type": "string",
            "example": "/var/cache/airflow/namespace-files",
            "default": None,
        },
        "cache_max_size": {
            "description": (
                "Cap on the cache's total size: bytes, or a number with a unit (KB, MB, GB, TB, "
                "KiB, MiB, GiB, TiB). The least recently used files are removed above it."
            ),
            "version_added": "0.1.0",
            "type": "string",
            "example": "50GiB",
            "default": "5GiB",
        },
        "cache_placement": {
            "description": (
                "How cached files are put into a working directory: auto (a reflink where the "
                "filesystem supports it, else a copy), copy, or hardlink (a read-only hard link, for "
                "tasks that never modify their files)."
            ),
            "version_added": "0.1.0",
            "type": "string",
            "example": "hardlink",
            "default": "auto",
        },
        "s3_presigned_downloads": {
            "description": (
                "Download S3 objects through presigned URLs on one aiohttp session, which costs a "
                "fraction of botocore's client CPU per object. Filesystems with requester pays, "
                "anonymous access, a custom signer or botocore proxies keep s3fs's own downloads."
            ),
            "version_added": "0.1.0",
            "type": "boolean",
            "example": "False",
            "default": "True",
        },
        "working_dir_root": {
            "description": (
                "Folder under which each task try gets a fresh working directory when the operator does "
                "not set one. When unset: the system temporary directory."
            ),
            "version_added": "0.1.0",
            "type": "string",
            "example": "/opt/airflow/work",
            "default": None,
        },
    },
}


def usable_cpu_count() -> int:
    """
    Count the CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` reports the host's cores even in a container limited to two of them, which
    would size the download budget for a machine the task does not have.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    """Return the cgroup CPU quota in cores (v2 ``cpu.max``, then v1 CFS files), or None if unlimited."""
    try:
        quota, _, period = Path("/sys/fs/cgroup/cpu.max").read_text().partition(" ")
        if quota.strip() != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def default_host_parallel_downloads() -> int:
    """Return the default host-wide budget: max(32, 4 x usable CPU cores)."""
    return max(32, 4 * usable_cpu_count())


@dataclass(frozen=True)
class NamespaceFilesSettings:
    """Resolved and validated ``[namespace_files]`` settings."""

    host_parallel_downloads: int
    task_parallel_downloads: int
    budget_dir: Path
    max_retries: int
    retry_initial_delay: float
    retry_max_delay: float
    working_dir_root: Path
    cache_enabled: bool
    cache_dir: Path
    cache_max_size: int
    cache_placement: str
    s3_presigned_downloads: bool


def _config_error(message: str) -> Exception:
    # Imported here: get_provider_info() imports this module while Airflow loads its configuration,
    # before the exceptions module's own Airflow import can complete.
    from kestra_perf_provider.exceptions import NamespaceFilesConfigError

    return NamespaceFilesConfigError(message)


_SECTION = ConfigSection(SECTION, CONFIG_SECTION, _config_error)
_read_option = _SECTION.read
_invalid = _SECTION.invalid
_parse_bool = _SECTION.parse_bool
_parse_int = _SECTION.parse_int


def _parse_float(option: str, value: Any, minimum: float) -> float:
    return _SECTION.parse_float(option, value, minimum)


def parse_task_cap(value: Any, host_budget: int, option: str = "task_parallel_downloads") -> int:
    """
    Turn a per-task cap into a number of downloads, never more than the host budget.

    A value written with a decimal point is a fraction of the host budget (``0.5``), rounded down but
    at least 1. A whole number (``8``) is an absolute number of downloads.
    """
    text = str(value).strip()
    expected = "a fraction of the host budget in (0, 1] such as 0.5, or a whole number >= 1 such as 8"
    if "." in text:
        try:
            fraction = float(text)
        except ValueError:
            raise _invalid(option, value, expected) from None
        if not 0 < fraction <= 1:
            raise _invalid(option, value, expected)
        return max(1, math.floor(host_budget * fraction))
    try:
        number = int(text)
    except ValueError:
        raise _invalid(option, value, expected) from None
    if number < 1:
        raise _invalid(option, value, expected)
    return min(number, host_budget)


def load_settings(
    *,
    host_parallel_downloads: int | None = None,
    task_parallel_downloads: int | float | str | None = None,
    budget_dir: str | os.PathLike[str] | None = None,
    max_retries: int | None = None,
    working_dir_root: str | os.PathLike[str] | None = None,
    cache_enabled: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_max_size: int | str | None = None,
    cache_placement: str | None = None,
    s3_presigned_downloads: bool | None = None,
) -> NamespaceFilesSettings:
    """
    Resolve and validate the staging settings.

    :param host_parallel_downloads: overrides ``[namespace_files] host_parallel_downloads``.
    :param task_parallel_downloads: overrides ``[namespace_files] task_parallel_downloads``; a float
        is a fraction of the host budget, an int a number of downloads.
    :param budget_dir: overrides ``[namespace_files] budget_dir``.
    :param max_retries: overrides ``[namespace_files] max_retries``.
    :param working_dir_root: overrides ``[namespace_files] working_dir_root``.
    :param cache_enabled: overrides ``[namespace_files] cache_enabled``; the other ``cache_*``
        arguments override their options likewise.
    :raises NamespaceFilesConfigError: a value has the wrong type or range; the message names the
        option, the value and where to fix it.
    """
    from kestra_perf_provider.namespace_files.budget import default_budget_directory
    from kestra_perf_provider.namespace_files.cache import PLACEMENTS, default_cache_directory, parse_size

    raw_budget = _read_option("host_parallel_downloads", host_parallel_downloads)
    host_budget = (
        default_host_parallel_downloads()
        if raw_budget is None
        else _parse_int("host_parallel_downloads", raw_budget, 1)
    )
    if isinstance(task_parallel_downloads, float):
        task_parallel_downloads = repr(task_parallel_downloads)
    task_cap = parse_task_cap(_read_option("task_parallel_downloads", task_parallel_downloads), host_budget)

    raw_dir = _read_option("budget_dir", budget_dir)
    raw_root = _read_option("working_dir_root", working_dir_root)
    initial_delay = _parse_float("retry_initial_delay", _read_option("retry_initial_delay", None), 0.0)
    max_delay = _parse_float("retry_max_delay", _read_option("retry_max_delay", None), 0.0)
    if max_delay < initial_delay:
        raise _invalid("retry_max_delay", max_delay, f"a number >= retry_initial_delay ({initial_delay})")

    raw_max_size = _read_option("cache_max_size", cache_max_size)
    try:
        max_size = parse_size(raw_max_size)
    except ValueError:
        raise _invalid("cache_max_size", raw_max_size, "a size such as 5GiB, 500MB or 1048576") from None
    placement = str(_read_option("cache_placement", cache_placement)).strip().lower()
    if placement not in PLACEMENTS:
        raise _invalid("cache_placement", placement, f"one of {', '.join(PLACEMENTS)}")
    raw_cache_dir = _read_option("cache_dir", cache_dir)

    return NamespaceFilesSettings(
        host_parallel_downloads=host_budget,
        task_parallel_downloads=task_cap,
        budget_dir=Path(raw_dir).expanduser() if raw_dir else default_budget_directory(),
        max_retries=_parse_int("max_retries", _read_option("max_retries", max_retries), 0),
        retry_initial_delay=initial_delay,
        retry_max_delay=max_delay,
        working_dir_root=Path(raw_root).expanduser() if raw_root else Path(tempfile.gettempdir()),
        cache_enabled=_parse_bool("cache_enabled", _read_option("cache_enabled", cache_enabled)),
        cache_dir=Path(raw_cache_dir).expanduser() if raw_cache_dir else default_cache_directory(),
        cache_max_size=max_size,
        cache_placement=placement,
        s3_presigned_downloads=_parse_bool(
            "s3_presigned_downloads", _read_option("s3_presigned_downloads", s3_presigned_downloads)
        ),
    )
