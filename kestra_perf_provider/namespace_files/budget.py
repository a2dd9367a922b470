"""Host-wide budget of parallel namespace-file downloads, shared by every task process on a host.

Airflow runs each task in its own process, so a per-task download cap alone lets ``N`` tasks on
one worker open ``N`` times as many connections. :class:`HostBudget` bounds the total. A budget of
size ``S`` is a directory containing the files ``slot-0000.lock`` to ``slot-{S-1}.lock``, and a
process holds a slot while it holds an exclusive :func:`fcntl.flock` lock on that slot's file.
Acquiring scans the slots from a random start with non-blocking lock attempts and, when all are
busy, retries after a short capped backoff with jitter. No server takes part.

All state lives in the kernel's lock table. The files are empty and never change, so a crash
leaves nothing to clean up. The kernel releases a ``flock`` lock when the last file descriptor on
its open file description closes, and it closes every descriptor of a process that exits,
including one killed with ``SIGKILL``. So a crashed task returns its slots at once. A child created
by :func:`os.fork` inherits the descriptors and would keep the locks alive after its parent dies,
so a fork handler closes them in the child. The directory defaults to
:func:`default_budget_directory`, and ``[namespace_files] budget_dir`` moves it.

Processes may configure different sizes on one directory. A process with size ``S`` only uses
slots ``0`` to ``S - 1``, so the host total never exceeds the largest size configured, and a
process with a smaller size competes only for the low slots.

Limits:

* The budget covers one host, because processes on other hosts use their own local directory.
* The default directory is per user (slot files are created with mode ``0o600``), so tasks that
  run as different users (``run_as_user``) get separate budgets.
* The directory must be on a file system that supports ``flock``, such as a local disk or tmpfs.
  A file system without lock support fails with an error naming the directory. Since Linux 2.6.12
  the NFS client emulates ``flock`` with byte-range locks held on the server (``flock(2)``). A
  budget on NFS is then shared by every client host, and two opens in one process no longer
  exclude each other. A crashed client's locks last until the server drops its lease. The
  ``local_lock=flock`` mount option keeps the locks on the client host instead (``nfs(5)``).
* The budget has no FIFO order: under constant contention one waiter can lose every retry until
  its timeout.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import random
import stat
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "BudgetDirectoryError",
    "BudgetTimeoutError",
    "HostBudget",
    "Slot",
    "default_budget_directory",
]

log = logging.getLogger(__name__)

BUDGET_DIR_OPTION = "[namespace_files] budget_dir"
BUDGET_DIR_ENV = "AIRFLOW__NAMESPACE_FILES__BUDGET_DIR"
# The option that sets the size lives in the settings module, which this module cannot import
# because the settings module imports Airflow. Keep the two names in step with it.
BUDGET_SIZE_OPTION = "[namespace_files] host_parallel_downloads"
BUDGET_SIZE_ENV = "AIRFLOW__NAMESPACE_FILES__HOST_PARALLEL_DOWNLOADS"

_SLOT_FILE_FORMAT = "slot-{index:04d}.lock"
# NOTE: every waiter scans all slots on each retry, at about 5 us per busy slot (an estimate for
# CPython 3.11 on x86-64). Hundreds of waiters on a budget of 32 slots keep a fraction of a core busy.
_INITIAL_BACKOFF = 0.001
_MAX_BACKOFF = 0.025
# errno values with which flock() reports that the file system cannot lock.
_NO_LOCK_SUPPORT = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})


class BudgetDirectoryError(OSError):
    """Error for a budget directory that is invalid or unwritable, or on a file system without ``flock``."""


class BudgetTimeoutError(TimeoutError):
    """Error raised when no slot of the host download budget became free within the timeout.

    :param directory: the budget directory
    :param size: the size of the budget that timed out
    :param timeout: the timeout in seconds
    """

    def __init__(self, directory: Path, size: int, timeout: float) -> None:
        self.directory = directory
        self.size = size
        self.timeout = timeout
        super().__init__(
            f"Timed out after {timeout:g} s waiting for a free slot in the host download budget "
            f"at {directory} (size {size}, all slots held by downloads on this host). Raise "
            f"{BUDGET_SIZE_OPTION} (env {BUDGET_SIZE_ENV}) or the acquire timeout, or run fewer "
            f"concurrent tasks on this host."
        )

    def __reduce__(self) -> tuple[type[BudgetTimeoutError], tuple[Path, int, float]]:
        return (type(self), (self.directory, self.size, self.timeout))


def default_budget_directory() -> Path:
    """Return the per-user default budget directory under :func:`tempfile.gettempdir`."""
    return Path(tempfile.gettempdir()) / f"airflow-namespace-files-{os.geteuid()}" / "budget"


class Slot:
    """One slot of a :class:`HostBudget`, held until :meth:`release`.

    Use it as a context manager, with ``with`` or ``async with``, to release it on exit.

    :ivar index: the slot number, from ``0`` to ``size - 1``
    """

    __slots__ = ("_budget", "_generation", "_released", "index")

    def __init__(self, budget: HostBudget, index: int, generation: int) -> None:
        self.index = index
        self._budget = budget
        self._generation = generation
        self._released = False

    def release(self) -> None:
        """Release the slot. Calling it again, or after the budget was closed, does nothing."""
        self._budget._release(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Slot index={self.index} {state} directory={self._budget.directory}>"


class HostBudget:
    """Budget of ``size`` parallel downloads shared by all processes on this host.

    Each object keeps one open file per slot it has used, so a process needs up to ``size`` file
    descriptors. The object is thread-safe. A child created by :func:`os.fork` starts with no
    slots and reopens the slot files on first use.

    :param directory: the budget directory, created with mode ``0o700`` if missing
    :param size: the number of slots this process may use. Processes with different sizes on one
        directory share slots ``0`` to ``min(sizes) - 1``.
    :raises TypeError: if ``size`` is not an int
    :raises ValueError: if ``size`` is less than 1 or ``directory`` is empty
    :raises BudgetDirectoryError: if the directory is invalid, unwritable, or on a file system
        without ``flock`` support
    """

    def __init__(self, directory: str | os.PathLike[str], size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"HostBudget size must be an int, got {size!r} of type {type(size).__name__}")
        if size < 1:
            raise ValueError(
                f"HostBudget size must be >= 1, got {size}. Set {BUDGET_SIZE_OPTION} "
                f"(env {BUDGET_SIZE_ENV}) to a positive integer"
            )
        if os.fspath(directory) == "":
            raise ValueError(
                f"The host download budget directory is empty. Set {BUDGET_DIR_OPTION} "
                f"(env {BUDGET_DIR_ENV}) to a directory path or leave it unset for the default"
            )
        # Absolute, because the task changes its working directory after the budget is created
        # and the slot files are opened lazily.
        self.directory = Path(directory).absolute()
        self.size = size
        self._mutex = threading.Lock()
        # Indexed by slot. The list object is never replaced, because the finalizer closes
        # whatever descriptors it contains when the budget is garbage collected.
        self._fds: list[int | None] = [None] * size
        self._held: set[int] = set()
        # Bumped by close() and by a fork, so that Slot objects from before do nothing on release.
        self._generation = 0
        self._closed = False

        _prepare_directory(self.directory)
        self._check_lock_support()
        weakref.finalize(self, _close_descriptors, self._fds)
        _live_budgets.add(self)

    def __repr__(self) -> str:
        return f"<HostBudget directory={self.directory} size={self.size}>"

    def try_acquire(self) -> Slot | None:
        """Take a free slot without waiting.

        :return: the slot, or ``None`` if all ``size`` slots are held
        """
        with self._mutex:
            self._raise_if_closed()
            start = random.randrange(self.size)
            for offset in range(self.size):
                index = (start + offset) % self.size
                # flock() on a description this process already locked succeeds again, so the
                # set is what keeps two threads of this process off the same slot.
                if index in self._held:
                    continue
                if self._lock(index):
                    self._held.add(index)
                    return Slot(self, index, self._generation)
        return None

    def acquire(self, timeout: float | None = None) -> Slot:
        """Take a slot, waiting until one is free.

        :param timeout: the maximum wait in seconds; ``None`` waits without limit
        :raises BudgetTimeoutError: if no slot became free within ``timeout``
        """
        deadline = self._deadline(timeout)
        backoff = _INITIAL_BACKOFF
        started = time.monotonic()
        while True:
            slot = self.try_acquire()
            if slot is not None:
                self._log_wait(slot, started)
                return slot
            delay = self._next_delay(backoff, deadline, timeout)
            time.sleep(delay)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def acquire_async(self, timeout: float | None = None) -> Slot:
        """Take a slot, waiting with :func:`asyncio.sleep` until one is free.

        Each attempt makes only non-blocking system calls, so the event loop keeps running
        while this coroutine waits.

        :param timeout: the maximum wait in seconds; ``None`` waits without limit
        :raises BudgetTimeoutError: if no slot became free within ``timeout``
        """
        deadline = self._deadline(timeout)
        backoff = _INITIAL_BACKOFF
        started = time.monotonic()
        while True:
            slot = self.try_acquire()
            if slot is not None:
                self._log_wait(slot, started)
                return slot
            delay = self._next_delay(backoff, deadline, timeout)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def slots_in_use(self) -> int:
        """Count the slots of ``0`` to ``size - 1`` held by any process on this host.

        The count probes each slot with a non-blocking lock that it releases at once, so a
        concurrent :meth:`try_acquire` elsewhere may see that slot as busy. Use it for statistics
        and tests, not to decide whether to acquire.
        """
        in_use = 0
        with self._mutex:
            self._raise_if_closed()
            for index in range(self.size):
                if index in self._held:
                    in_use += 1
                elif self._lock(index):
                    fcntl.flock(self._fd(index), fcntl.LOCK_UN)
                else:
                    in_use += 1
        return in_use

    def close(self) -> None:
        """Release every slot this object holds and close its slot files.

        Slots still held become released, their :meth:`Slot.release` does nothing, and any
        later acquire raises :class:`ValueError`. Calling it again does nothing.
        """
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._generation += 1
            self._held.clear()
            # The fork handler closed the children's copies, so these are the only descriptors
            # on their descriptions and closing them drops the locks.
            _close_descriptors(self._fds)

    def _release(self, slot: Slot) -> None:
        with self._mutex:
            if slot._released:
                return
            slot._released = True
            if slot._generation != self._generation:
                # Closed or inherited across fork: this object no longer holds the lock.
                return
            fd = self._fds[slot.index]
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._held.discard(slot.index)

    def _fd(self, index: int) -> int:
        fd = self._fds[index]
        if fd is None:
            fd = _open_slot_file(self.directory / _SLOT_FILE_FORMAT.format(index=index))
            self._fds[index] = fd
        return fd

    def _lock(self, index: int) -> bool:
        """Try to lock one slot file without waiting. Call with ``_mutex`` held."""
        try:
            fcntl.flock(self._fd(index), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in _NO_LOCK_SUPPORT:
                raise _no_lock_support_error(self.directory, err) from err
            raise
        return True

    def _check_lock_support(self) -> None:
        # A shared lock conflicts only with an exclusive holder, which also proves locking works.
        with self._mutex:
            fd = self._fd(0)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in _NO_LOCK_SUPPORT:
                    raise _no_lock_support_error(self.directory, err) from err
                raise
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise ValueError(f"HostBudget for {self.directory} is closed. Create a new one to acquire slots.")

    def _forget_inherited_locks(self) -> None:
        """Drop the state a forked child inherited without touching the parent's locks.

        The child's descriptors share open file descriptions with the parent's. ``LOCK_UN`` on
        them would release the parent's slots, while closing them only drops the child's
        reference. Keeping them open would keep the parent's locks alive after the parent dies.
        """
        # Another thread of the parent may have held the mutex at fork time, and that thread
        # does not exist in the child.
        self._mutex = threading.Lock()
        self._generation += 1
        self._held.clear()
        _close_descriptors(self._fds)

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        if timeout is None:
            return None
        if timeout < 0:
            raise ValueError(f"acquire timeout must be >= 0 seconds or None, got {timeout!r}")
        return time.monotonic() + timeout

    def _next_delay(self, backoff: float, deadline: float | None, timeout: float | None) -> float:
        """Return the next sleep with jitter, or raise if the deadline has passed."""
        delay = random.uniform(backoff / 2, backoff)
        if deadline is None:
            return delay
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            assert timeout is not None
            raise BudgetTimeoutError(self.directory, self.size, timeout)
        return min(delay, remaining)

    def _log_wait(self, slot: Slot, started: float) -> None:
        waited = time.monotonic() - started
        if waited >= _INITIAL_BACKOFF:
            log.debug(
                "Acquired host download slot index=%s after waiting %.3f s directory=%s size=%s",
                slot.index,
                waited,
                self.directory,
                self.size,
            )


def _prepare_directory(directory: Path) -> None:
    """Create the budget directory and its missing parents with mode ``0o700``."""
    missing: list[Path] = []
    candidate = directory
    while not os.path.lexists(candidate):
        missing.append(candidate)
        candidate = candidate.parent
    for path in reversed(missing):
        try:
            # os.makedirs applies its mode to the last directory only, so create each one here.
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass  # another process created it first
        except OSError as err:
            raise _directory_error(directory, f"cannot be created ({err.strerror})") from err

    try:
        status = os.stat(directory)
    except OSError as err:
        raise _directory_error(directory, f"cannot be read ({err.strerror})") from err
    if not stat.S_ISDIR(status.st_mode):
        raise _directory_error(directory, "exists but is not a directory")
    if directory == default_budget_directory():
        # Anyone can create names in the shared temporary directory. A budget directory that
        # another user created first would let that user hold our slots.
        for path in (directory, directory.parent):
            owner = os.stat(path).st_uid
            if owner != os.geteuid():
                raise _directory_error(
                    path, f"is owned by uid {owner}, not by the current user uid {os.geteuid()}"
                )


def _open_slot_file(path: Path) -> int:
    # Read-write, because NFS needs a file opened for writing to place an exclusive lock.
    # O_CLOEXEC keeps the descriptor, and with it the lock, out of programs this process execs.
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        problem = f"contains a slot file {path.name} that cannot be opened ({err.strerror})"
        raise _directory_error(path.parent, problem) from err


def _close_descriptors(fds: list[int | None]) -> None:
    for index, fd in enumerate(fds):
        if fd is not None:
            fds[index] = None
            try:
                os.close(fd)
            except OSError:
                pass  # already closed, for example by code that closes all descriptors after fork


def _directory_error(path: Path, problem: str) -> BudgetDirectoryError:
    return BudgetDirectoryError(
        f"The host download budget directory {path} {problem}. Fix its permissions or set "
        f"{BUDGET_DIR_OPTION} (env {BUDGET_DIR_ENV}) to a writable local directory."
    )


def _no_lock_support_error(directory: Path, err: OSError) -> BudgetDirectoryError:
    return BudgetDirectoryError(
        f"The file system of the host download budget directory {directory} does not support "
        f"flock() ({err.strerror}). Set {BUDGET_DIR_OPTION} (env {BUDGET_DIR_ENV}) to a directory "
        f"on a local file system such as /tmp."
    )


_live_budgets: weakref.WeakSet[HostBudget] = weakref.WeakSet()


def _forget_inherited_locks_in_child() -> None:
    for budget in list(_live_budgets):
        budget._forget_inherited_locks()


os.register_at_fork(after_in_child=_forget_inherited_locks_in_child)
