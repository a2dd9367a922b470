"""
Cache: a content cache per worker host, so unchanged namespace files are downloaded once.

Staging still lists every namespace on every run, so a changed object is always noticed. Each
listed object gets a cache key from its location and its identity (version id, then ETag or
checksum, then size plus modification time; :func:`.sources.file_identity`). An object whose key
has a valid entry is placed into the working directory without a request. Any other is downloaded
into the cache, atomically, and then placed. An object whose filesystem reports no identity is
downloaded directly, never cached.

Layout of ``cache_dir``:

- ``objects/ab/<key>``: one entry per object version, read-only, its modification time set to a
  value derived from the key. A write through a hard link changes the size or the modification
  time, so the entry no longer validates and is downloaded again.
- ``tmp/<key>.<random>.part``: downloads in progress.
- ``locks/keys.lock``: one byte of this file per key, locked with an open file description lock
  (``F_OFD_SETLK``). Like ``flock``, such a lock conflicts between two ``open()`` calls even in
  one process and is released when its descriptor closes, but it covers a byte range. The holder of a key's
  lock may download, validate, place or evict that key's entry. Tasks that need the same missing
  file therefore download it once: the first takes the lock and downloads, the others wait for
  the lock (holding no slot of the host download budget) and then find a valid entry. A killed
  process's locks are released by the kernel, and its temporary files are removed by the next
  staging that finds their key unlocked.

Placement (``[namespace_files] cache_placement``):

- ``auto`` (default): a reflink (``FICLONE``: a copy-on-write clone on btrfs, XFS and others) where
  the filesystem supports it, else a copy. A task may modify its files freely.
- ``copy``: always a byte copy.
- ``hardlink``: a hard link to the read-only entry, the fastest and without extra disk. Only for
  tasks that never modify their files: read-only mode does not stop a task running as root, so a
  task that writes through the link damages the entry, which the next validation detects and
  replaces.

Eviction keeps the cache under ``cache_max_size``, least recently placed first, after each staging
that added entries; an entry whose key lock is held (being placed or downloaded) is skipped.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import stat
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kestra_perf_provider.namespace_files.planning import RemoteFile
    from kestra_perf_provider.namespace_files.sources import Namespace

log = logging.getLogger(__name__)

_FICLONE = 0x40049409  # from linux/fs.h
_NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS})
_INITIAL_BACKOFF = 0.001
_MAX_BACKOFF = 0.02
# Eviction removes entries until the cache is this fraction of its cap, so that a cache at its cap
# does not scan and evict after every staging.
_EVICTION_TARGET = 0.9
PLACEMENTS = ("auto", "copy", "hardlink")


def default_cache_directory() -> Path:
    """Return the per-user default cache folder under the system temporary directory."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"airflow-namespace-files-{os.geteuid()}" / "cache"


def cache_key(remote: RemoteFile) -> str | None:
    """Return the cache key of one listed object version, or None when it has no identity."""
    if remote.identity is None:
        return None
    location = json.dumps([_namespace_location(remote.namespace), remote.path, remote.identity, remote.size])
    return hashlib.sha256(location.encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def _namespace_location(namespace: Namespace) -> str:
    # Options hold the endpoint; only their hash is kept, never their values (credentials).
    options = json.dumps(dict(namespace.storage_options), sort_keys=True, default=str)
    return json.dumps([namespace.protocol, namespace.conn_id, hashlib.sha256(options.encode()).hexdigest()])


def _sentinel_mtime_ns(key: str) -> int:
    # A fixed, key-derived modification time in 2001-2032: any write to the entry replaces it.
    return (1_000_000_000 + int(key[:8], 16) % 1_000_000_000) * 1_000_000_000


@dataclass
class CacheStats:
    """Counters of the cache's work during one staging."""

    inserted: int = 0
    inserted_bytes: int = 0
    discarded: int = 0
    evicted: int = 0
    stale_temporary_files: int = 0


class KeyLock:
    """An exclusive lock on one key's byte of the lock file, through its own open file description."""

    def __init__(self, path: Path, key: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # 60 bits of the key's hash as the offset: distinct keys practically never share a byte.
        self._request = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, int(key[:15], 16), 1, 0)

    def try_lock(self) -> bool:
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, self._request)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self) -> None:
        # Closing the only descriptor of the description releases its locks.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class NamespaceCache:
    """
    The host's cache of namespace files.

    :param directory: cache folder; every task process of the host should use the same one.
    :param max_size: cap in bytes on the entries' total size.
    :param placement: ``auto``, ``copy`` or ``hardlink``.
    """

    def __init__(self, directory: str | os.PathLike[str], max_size: int, placement: str = "auto") -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"Invalid cache placement {placement!r}: expected one of {', '.join(PLACEMENTS)}.")
        self.directory = Path(directory).absolute()
        self.max_size = max_size
        self.placement = placement
        self.stats = CacheStats()
        self._reflink_supported = placement == "auto"
        self._objects = self.directory / "objects"
        self._tmp = self.directory / "tmp"
        self._locks = self.directory / "locks"
        for folder in (self._objects, self._tmp, self._locks):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Entries fan out into 256 folders by the first two hex digits of their key. Creating them
        # once here keeps a directory creation off every cache miss.
        if not (self._objects / "ff").is_dir():
            for prefix in range(256):
                (self._objects / f"{prefix:02x}").mkdir(exist_ok=True, mode=0o700)

    # Paths and locks

    def entry_path(self, key: str) -> Path:
        return self._objects / key[:2] / key

    def temporary_path(self, key: str) -> Path:
        return self._tmp / f"{key}.{uuid.uuid4().hex[:12]}.part"

    @property
    def _lock_file(self) -> Path:
        return self._locks / "keys.lock"

    def try_lock(self, key: str) -> KeyLock | None:
        """Return the key's key lock if it is free now, else None."""
        lock = KeyLock(self._lock_file, key)
        if lock.try_lock():
            return lock
        lock.release()
        return None

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold the key's key lock, waiting for it with a blocking backoff loop."""
        lock = KeyLock(self._lock_file, key)
        try:
            backoff = _INITIAL_BACKOFF
            while not lock.try_lock():
                time.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, _MAX_BACKOFF)
            yield
        finally:
            lock.release()

    async def lock_async(self, key: str) -> KeyLock:
        """Return the key's held key lock, waiting without blocking the event loop."""
        lock = KeyLock(self._lock_file, key)
        try:
            backoff = _INITIAL_BACKOFF
            while not lock.try_lock():
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, _MAX_BACKOFF)
        except BaseException:
            lock.release()
            raise
        return lock

    # Entries

    def valid_entry(self, key: str, size: int | None) -> Path | None:
        """
        Return the key's entry if it passes its checks, else discard it and return None.

        The caller holds the key's key lock.
        """
        entry = self.entry_path(key)
        try:
            status = entry.stat()
        except FileNotFoundError:
            return None
        if (
            not stat.S_ISREG(status.st_mode)
            or (size is not None and status.st_size != size)
            or status.st_mtime_ns != _sentinel_mtime_ns(key)
        ):
            log.warning(
                "Discarding damaged cache entry %s (size %d, expected %s); downloading it again",
                entry,
                status.st_size,
                size,
            )
            self._remove(entry)
            self.stats.discarded += 1
            return None
        return entry

    def commit(
        self, key: str, temporary: Path, expected_md5: str | None = None, actual_md5: str | None = None
    ) -> Path:
        """
        Move a complete download into the cache as the key's read-only entry.

        :param actual_md5: the download's MD5 if computed while receiving it; else the file is read
            again when ``expected_md5`` is known.
        :raises OSError: the file's MD5 differs from ``expected_md5`` (the caller retries).
        """
        if expected_md5 is not None and (actual_md5 or _md5_of(temporary)) != expected_md5:
            from kestra_perf_provider.namespace_files.transfer import IncompleteDownloadError

            raise IncompleteDownloadError(f"content does not match its MD5 checksum {expected_md5}")
        size = os.stat(temporary).st_size
        os.chmod(temporary, 0o444)
        os.utime(temporary, ns=(time.time_ns(), _sentinel_mtime_ns(key)))
        entry = self.entry_path(key)
        try:
            os.replace(temporary, entry)
        except FileNotFoundError:  # A fan-out folder removed by hand since the cache was opened.
            entry.parent.mkdir(exist_ok=True, mode=0o700)
            os.replace(temporary, entry)
        self.stats.inserted += 1
        self.stats.inserted_bytes += size
        return entry

    def place(self, entry: Path, destination: Path, key: str) -> int:
        """
        Put an entry's content at ``destination`` (atomically) and mark the entry as used.

        The caller holds the key's key lock, so eviction cannot remove the entry meanwhile.
        """
        temporary = destination.parent / f".nsf-{uuid.uuid4().hex[:16]}.part"
        try:
            if self.placement == "hardlink":
                os.link(entry, temporary)
            elif not (self._reflink_supported and self._reflink(entry, temporary)):
                shutil.copyfile(entry, temporary)
            os.replace(temporary, destination)
        except BaseException:
            _unlink_quietly(temporary)
            raise
        # The access time orders eviction; the modification time stays the key's sentinel.
        os.utime(entry, ns=(time.time_ns(), _sentinel_mtime_ns(key)))
        return entry.stat().st_size

    def _reflink(self, source: Path, target: Path) -> bool:
        with open(source, "rb") as reader, open(target, "wb") as writer:
            try:
                fcntl.ioctl(writer.fileno(), _FICLONE, reader.fileno())
                return True
            except OSError as err:
                if err.errno not in _NO_REFLINK:
                    raise
        self._reflink_supported = False
        log.debug("Reflinks are not supported under %s; placing cached files as copies", self.directory)
        return False

    # Housekeeping

    def remove_stale_temporary_files(self) -> int:
        """Remove downloads in progress left by killed processes: those whose key is unlocked."""
        removed = 0
        for path in self._tmp.glob("*.part"):
            key = path.name.split(".", 1)[0]
            if len(key) != 64:
                continue
            lock = KeyLock(self._lock_file, key)
            try:
                # A writer holds its key's lock for the whole download, so an unlocked key means
                # that no process is writing this file.
                if lock.try_lock():
                    _unlink_quietly(path)
                    removed += 1
            finally:
                lock.release()
        self.stats.stale_temporary_files += removed
        return removed

    def evict(self) -> int:
        """Remove the least recently placed entries until the cache is under its cap."""
        entries = []
        total = 0
        for folder in self._objects.iterdir():
            for item in os.scandir(folder):
                status = item.stat(follow_symlinks=False)
                entries.append((status.st_atime_ns, status.st_size, Path(item.path)))
                total += status.st_size
        if total <= self.max_size:
            return 0
        target = int(self.max_size * _EVICTION_TARGET)
        evicted = 0
        for _, size, path in sorted(entries):
            if total <= target:
                break
            lock = KeyLock(self._lock_file, path.name)
            try:
                if not lock.try_lock():
                    continue  # Being downloaded or placed right now.
                self._remove(path)
            finally:
                lock.release()
            total -= size
            evicted += 1
        self.stats.evicted += evicted
        log.debug("Evicted %d cache entries; the cache now contains about %d bytes", evicted, total)
        return evicted

    @staticmethod
    def _remove(entry: Path) -> None:
        try:
            os.chmod(entry, stat.S_IRWXU)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                os.unlink(entry)
        except FileNotFoundError:
            pass


def expected_md5(identity: str | None) -> str | None:
    """Return the MD5 a checksum identity promises (an S3 single-part ETag is the MD5), else None."""
    if identity and identity.startswith("checksum:"):
        value = identity.removeprefix("checksum:").lower()
        if len(value) == 32 and all(char in "0123456789abcdef" for char in value):
            return value
    return None


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def parse_size(value: Any) -> int:
    """
    Parse a size such as ``5GiB``, ``500 MB`` or ``1048576`` into bytes.

    :raises ValueError: the value is not a size.
    """
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
    units |= {"g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number) :]
    try:
        size = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {value!r}") from None
    if not 0 <= size < 2**63:
        raise ValueError(f"not a size: {value!r}")
    return int(size)
