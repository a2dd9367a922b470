"""Tests for the host-wide download budget, with real processes, threads, fork and SIGKILL."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kestra_perf_provider.namespace_files.budget import (
    BudgetDirectoryError,
    BudgetTimeoutError,
    HostBudget,
    default_budget_directory,
)

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")
NOBODY_UID = 65534
# Upper limits, in seconds, for waits that only run out when a test fails. No test asserts a duration.
PROCESS_WAIT = 60.0
ACQUIRE_WAIT = 30.0


@pytest.fixture
def budget_dir(tmp_path: Path) -> Path:
    return tmp_path / "budget"


@pytest.fixture
def make_budget(budget_dir: Path):
    budgets: list[HostBudget] = []

    def make(size: int, directory: Path = budget_dir) -> HostBudget:
        budget = HostBudget(directory, size)
        budgets.append(budget)
        return budget

    yield make
    for budget in budgets:
        budget.close()


def _stop_process(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():
        process.kill()
    process.join(PROCESS_WAIT)


def _wait_for_exit(process: multiprocessing.process.BaseProcess) -> None:
    # join() waits for the process sentinel pipe to close, and a child forked by the process keeps
    # it open, so poll the exit status instead.
    deadline = time.monotonic() + PROCESS_WAIT
    while process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)


# Functions run in spawned processes must be importable, so they live at module level.


def _hold_all_slots(directory: str, size: int, ready) -> None:
    budget = HostBudget(directory, size)
    slots = [budget.acquire(timeout=ACQUIRE_WAIT) for _ in range(size)]
    assert len({slot.index for slot in slots}) == size
    ready.set()
    time.sleep(PROCESS_WAIT * 2)


def _hold_slot_and_fork(directory: str, child_pid, ready, stop_child) -> None:
    budget = HostBudget(directory, 1)
    budget.acquire(timeout=ACQUIRE_WAIT)
    pid = os.fork()
    if pid == 0:
        # The child outlives this process so that the test can check that it keeps no lock.
        try:
            stop_child.wait(PROCESS_WAIT * 2)
        finally:
            os._exit(0)
    child_pid.value = pid
    ready.set()
    time.sleep(PROCESS_WAIT * 2)


def _contend(directory: str, size: int, mode: str, contenders: int, rounds: int, hold: float, meter) -> None:
    """Acquire and hold slots from ``contenders`` threads or coroutines, reporting to ``meter``."""
    in_flight, peak, completed, lock, start = meter
    budget = HostBudget(directory, size)
    start.wait(PROCESS_WAIT)

    # The count goes up after the slot is held and down before it is released, so it never
    # exceeds the number of slots really held.
    def enter() -> None:
        with lock:
            in_flight.value += 1
            peak.value = max(peak.value, in_flight.value)

    def leave() -> None:
        with lock:
            in_flight.value -= 1
            completed.value += 1

    if mode == "threads":

        def run() -> None:
            for _ in range(rounds):
                with budget.acquire(timeout=PROCESS_WAIT):
                    enter()
                    time.sleep(hold)
                    leave()

        with ThreadPoolExecutor(max_workers=contenders) as pool:
            futures = [pool.submit(run) for _ in range(contenders)]
        for future in futures:
            future.result()  # re-raises an error of the thread in this process
    else:

        async def run_async() -> None:
            for _ in range(rounds):
                async with await budget.acquire_async(timeout=PROCESS_WAIT):
                    enter()
                    await asyncio.sleep(hold)
                    leave()

        async def main() -> None:
            await asyncio.gather(*(run_async() for _ in range(contenders)))

        asyncio.run(main())
    budget.close()


class TestHostBudgetConstruction:
    @pytest.mark.parametrize("size", [pytest.param(0, id="zero"), pytest.param(-3, id="negative")])
    def test_size_below_one_rejected(self, budget_dir, size):
        with pytest.raises(ValueError, match=rf"size must be >= 1, got {size}"):
            HostBudget(budget_dir, size)

    @pytest.mark.parametrize("size", [pytest.param(2.0, id="float"), pytest.param(True, id="bool")])
    def test_size_not_int_rejected(self, budget_dir, size):
        with pytest.raises(TypeError, match="size must be an int"):
            HostBudget(budget_dir, size)

    def test_directory_created_private(self, tmp_path, make_budget):
        directory = tmp_path / "parent" / "budget"

        budget = make_budget(2, directory)

        assert budget.directory == directory
        assert budget.size == 2
        assert directory.stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "parent").stat().st_mode & 0o777 == 0o700

    def test_existing_directory_mode_kept(self, budget_dir, make_budget):
        budget_dir.mkdir(mode=0o755)
        budget_dir.chmod(0o755)

        make_budget(2)

        assert budget_dir.stat().st_mode & 0o777 == 0o755

    def test_relative_directory_made_absolute(self, tmp_path, monkeypatch, make_budget):
        monkeypatch.chdir(tmp_path)

        budget = make_budget(1, Path("relative-budget"))
        monkeypatch.chdir("/")
        slot = budget.try_acquire()

        assert budget.directory == tmp_path / "relative-budget"
        assert slot is not None
        assert (tmp_path / "relative-budget" / f"slot-{slot.index:04d}.lock").exists()

    def test_file_instead_of_directory_rejected(self, budget_dir):
        budget_dir.write_text("not a directory")

        with pytest.raises(BudgetDirectoryError, match="is not a directory") as info:
            HostBudget(budget_dir, 2)

        assert str(budget_dir) in str(info.value)
        assert "[namespace_files] budget_dir" in str(info.value)
        assert "AIRFLOW__NAMESPACE_FILES__BUDGET_DIR" in str(info.value)

    def test_file_as_parent_rejected(self, tmp_path):
        (tmp_path / "file").write_text("")

        with pytest.raises(BudgetDirectoryError, match="cannot be created") as info:
            HostBudget(tmp_path / "file" / "budget", 2)

        assert str(tmp_path / "file" / "budget") in str(info.value)
        assert "[namespace_files] budget_dir" in str(info.value)

    def test_empty_directory_rejected(self):
        with pytest.raises(ValueError, match=r"directory is empty. Set \[namespace_files\] budget_dir"):
            HostBudget("", 2)

    @pytest.mark.parametrize(
        "existing",
        [pytest.param(False, id="cannot-create"), pytest.param(True, id="cannot-create-slot-file")],
    )
    def test_unwritable_directory_rejected(self, existing):
        # Permission checks do not apply to root, so under root the child switches to uid 65534 first.
        parent = Path(tempfile.mkdtemp(prefix="budget-unwritable-"))
        directory = parent / "budget"
        try:
            if existing:
                directory.mkdir()
            os.chmod(parent, 0o555)
            os.chmod(directory if existing else parent, 0o555)
            receiver, sender = FORK.Pipe(duplex=False)

            def construct() -> None:
                if os.geteuid() == 0:
                    os.setgid(NOBODY_UID)
                    os.setuid(NOBODY_UID)
                try:
                    HostBudget(directory, 2)
                except BudgetDirectoryError as err:
                    sender.send(str(err))
                else:
                    sender.send("no error")

            process = FORK.Process(target=construct)
            process.start()
            message = receiver.recv() if receiver.poll(PROCESS_WAIT) else "no message"
            _stop_process(process)
        finally:
            os.chmod(parent, 0o700)
            shutil.rmtree(parent)

        assert str(directory) in message
        assert "Permission denied" in message
        assert "[namespace_files] budget_dir" in message

    def test_default_directory_per_user(self, monkeypatch, tmp_path):
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

        directory = default_budget_directory()

        assert directory == tmp_path / f"airflow-namespace-files-{os.geteuid()}" / "budget"

    @pytest.mark.skipif(os.geteuid() != 0, reason="only root can create a directory owned by another user")
    def test_default_directory_of_other_user_rejected(self, monkeypatch, tmp_path):
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        squatted = tmp_path / f"airflow-namespace-files-{os.geteuid()}"
        squatted.mkdir(mode=0o777)
        os.chown(squatted, NOBODY_UID, NOBODY_UID)

        with pytest.raises(BudgetDirectoryError, match=f"owned by uid {NOBODY_UID}") as info:
            HostBudget(default_budget_directory(), 2)

        assert str(squatted) in str(info.value)


class TestTryAcquire:
    def test_returns_none_when_full(self, make_budget):
        budget = make_budget(3)

        slots = [budget.try_acquire() for _ in range(3)]
        extra = budget.try_acquire()

        assert sorted(slot.index for slot in slots) == [0, 1, 2]
        assert extra is None

    def test_released_slot_reused(self, make_budget):
        budget = make_budget(2)
        first = budget.try_acquire()
        budget.try_acquire()

        first.release()
        again = budget.try_acquire()

        assert again is not None
        assert again.index == first.index

    def test_release_idempotent(self, make_budget):
        budget = make_budget(1)
        observer = make_budget(1)
        stale = budget.try_acquire()
        stale.release()
        current = budget.try_acquire()

        stale.release()

        assert current is not None
        assert budget.try_acquire() is None
        assert observer.try_acquire() is None
        assert observer.slots_in_use() == 1

    def test_two_objects_in_one_process_exclude(self, make_budget):
        first = make_budget(1)
        second = make_budget(1)

        held = first.try_acquire()

        assert held is not None
        assert second.try_acquire() is None
        held.release()
        assert second.try_acquire() is not None

    def test_threads_never_share_slot(self, make_budget):
        budget = make_budget(1)
        held = budget.try_acquire()
        results: list[object] = []

        thread = threading.Thread(target=lambda: results.append(budget.try_acquire()))
        thread.start()
        thread.join()

        assert held is not None
        assert results == [None]


class TestAcquire:
    def test_waits_for_release(self, make_budget):
        budget = make_budget(1)
        held = budget.try_acquire()
        waiting = threading.Event()
        released = threading.Event()

        def release_later() -> None:
            waiting.wait(PROCESS_WAIT)
            held.release()
            released.set()

        thread = threading.Thread(target=release_later)
        thread.start()
        waiting.set()
        slot = budget.acquire(timeout=ACQUIRE_WAIT)
        thread.join()

        assert released.is_set()
        assert slot.index == 0

    def test_timeout_raises_with_message(self, make_budget, budget_dir):
        budget = make_budget(2)
        budget.try_acquire()
        budget.try_acquire()

        with pytest.raises(BudgetTimeoutError) as info:
            budget.acquire(timeout=0.05)

        message = str(info.value)
        assert str(budget_dir) in message
        assert "size 2" in message
        assert "0.05 s" in message
        assert "[namespace_files] host_parallel_downloads" in message
        assert "AIRFLOW__NAMESPACE_FILES__HOST_PARALLEL_DOWNLOADS" in message
        assert isinstance(info.value, TimeoutError)

    def test_timeout_zero_tries_once(self, make_budget):
        budget = make_budget(1)

        slot = budget.acquire(timeout=0)

        assert slot.index == 0
        with pytest.raises(BudgetTimeoutError):
            budget.acquire(timeout=0)

    def test_negative_timeout_rejected(self, make_budget):
        budget = make_budget(1)

        with pytest.raises(ValueError, match=r"timeout must be >= 0 seconds or None, got -1"):
            budget.acquire(timeout=-1)

    def test_timeout_error_pickles(self, budget_dir):
        error = BudgetTimeoutError(budget_dir, 4, 2.5)

        copy = pickle.loads(pickle.dumps(error))

        assert str(copy) == str(error)
        assert (copy.directory, copy.size, copy.timeout) == (budget_dir, 4, 2.5)

    def test_context_manager_releases(self, make_budget):
        budget = make_budget(1)

        with budget.acquire(timeout=ACQUIRE_WAIT) as slot:
            in_use_inside = budget.slots_in_use()

        assert slot.index == 0
        assert in_use_inside == 1
        assert budget.slots_in_use() == 0

    def test_close_releases_held_slots(self, make_budget):
        budget = make_budget(2)
        observer = make_budget(2)
        slot = budget.try_acquire()
        budget.try_acquire()

        budget.close()
        slot.release()

        assert observer.slots_in_use() == 0
        with pytest.raises(ValueError, match="is closed"):
            budget.try_acquire()


class TestAcquireAsync:
    def test_loop_runs_while_waiting(self, make_budget):
        budget = make_budget(1)
        holder = make_budget(1)
        held = holder.try_acquire()
        ticks = 0

        async def tick_then_release() -> None:
            # This coroutine only runs if acquire_async yields to the loop, and the slot only
            # frees after it has run five times.
            nonlocal ticks
            while ticks < 5:
                await asyncio.sleep(0.001)
                ticks += 1
            held.release()

        async def main() -> int:
            ticker = asyncio.create_task(tick_then_release())
            slot = await budget.acquire_async(timeout=ACQUIRE_WAIT)
            await ticker
            return slot.index

        index = asyncio.run(main())

        assert ticks == 5
        assert index == 0

    def test_timeout_raises(self, make_budget):
        budget = make_budget(1)
        budget.try_acquire()

        with pytest.raises(BudgetTimeoutError, match="size 1"):
            asyncio.run(budget.acquire_async(timeout=0.05))

    def test_async_context_manager_releases(self, make_budget):
        budget = make_budget(1)

        async def main() -> int:
            async with await budget.acquire_async(timeout=ACQUIRE_WAIT):
                return budget.slots_in_use()

        assert asyncio.run(main()) == 1
        assert budget.slots_in_use() == 0


class TestSizes:
    def test_smaller_size_uses_low_slots(self, make_budget):
        small = make_budget(2)
        large = make_budget(4)

        small_slots = [small.try_acquire(), small.try_acquire()]
        large_slots = [large.try_acquire(), large.try_acquire()]

        assert sorted(slot.index for slot in small_slots) == [0, 1]
        assert sorted(slot.index for slot in large_slots) == [2, 3]
        assert small.try_acquire() is None
        assert large.try_acquire() is None
        assert large.slots_in_use() == 4
        assert small.slots_in_use() == 2

    def test_larger_size_can_starve_smaller(self, make_budget):
        small = make_budget(2)
        large = make_budget(4)

        large_slots = [large.try_acquire() for _ in range(4)]

        assert all(slot is not None for slot in large_slots)
        assert small.try_acquire() is None


class TestSlotsInUse:
    def test_counts_own_and_other_holders(self, make_budget):
        budget = make_budget(4)
        other = make_budget(4)
        budget.try_acquire()
        other.try_acquire()
        other.try_acquire()

        assert budget.slots_in_use() == 3
        assert other.slots_in_use() == 3

    def test_probe_leaves_slots_free(self, make_budget):
        budget = make_budget(3)

        assert budget.slots_in_use() == 0
        assert budget.slots_in_use() == 0
        assert len([budget.try_acquire() for _ in range(3)]) == 3
        assert budget.try_acquire() is None


class TestAcrossProcesses:
    @pytest.mark.parametrize("size", [6])
    def test_max_in_flight_equals_size(self, budget_dir, size):
        lock = SPAWN.Lock()
        meter = (
            SPAWN.Value("i", 0, lock=False),
            SPAWN.Value("i", 0, lock=False),
            SPAWN.Value("i", 0, lock=False),
            lock,
            SPAWN.Event(),
        )
        contenders, rounds = 6, 12
        modes = ["threads", "asyncio", "threads", "asyncio"]
        processes = [
            SPAWN.Process(
                target=_contend,
                args=(str(budget_dir), size, mode, contenders, rounds, 0.01, meter),
            )
            for mode in modes
        ]
        for process in processes:
            process.start()
        meter[4].set()
        try:
            for process in processes:
                process.join(PROCESS_WAIT)
        finally:
            for process in processes:
                _stop_process(process)

        in_flight, peak, completed = meter[0].value, meter[1].value, meter[2].value
        assert [process.exitcode for process in processes] == [0] * len(processes)
        assert completed == len(modes) * contenders * rounds
        assert in_flight == 0
        assert peak <= size
        assert peak == size

    def test_sigkill_releases_all_slots(self, budget_dir, make_budget):
        size = 5
        ready = SPAWN.Event()
        process = SPAWN.Process(target=_hold_all_slots, args=(str(budget_dir), size, ready))
        process.start()
        try:
            assert ready.wait(PROCESS_WAIT)
            budget = make_budget(size)
            assert budget.try_acquire() is None
            assert budget.slots_in_use() == size

            os.kill(process.pid, signal.SIGKILL)
            process.join(PROCESS_WAIT)
        finally:
            _stop_process(process)

        slots = [budget.acquire(timeout=ACQUIRE_WAIT) for _ in range(size)]
        assert process.exitcode == -signal.SIGKILL
        assert sorted(slot.index for slot in slots) == list(range(size))


class TestFork:
    def test_child_close_keeps_parent_lock(self, make_budget):
        budget = make_budget(1)
        observer = make_budget(1)
        held = budget.try_acquire()

        # The at-fork handler closes the child's copy of the slot descriptor; the child then exits.
        child = FORK.Process(target=lambda: None)
        child.start()
        child.join(PROCESS_WAIT)

        assert held is not None
        assert child.exitcode == 0
        assert observer.try_acquire() is None

    def test_child_keeps_no_slot_after_parent_closes(self, make_budget):
        budget = make_budget(1)
        observer = make_budget(1)
        budget.try_acquire()
        ready = FORK.Event()
        stop = FORK.Event()

        def child_main() -> None:
            ready.set()  # the at-fork handler has run by now
            stop.wait(PROCESS_WAIT)

        child = FORK.Process(target=child_main)
        child.start()
        try:
            assert ready.wait(PROCESS_WAIT)
            # close() drops the lock by closing the descriptor, which only releases it if no
            # forked child still has a copy of that descriptor.
            budget.close()
            child_alive = child.is_alive()
            in_use = observer.slots_in_use()
        finally:
            stop.set()
            _stop_process(child)

        assert child_alive
        assert in_use == 0

    def test_child_keeps_no_slot_after_parent_sigkill(self, budget_dir, make_budget):
        child_pid = SPAWN.Value("i", 0)
        ready = SPAWN.Event()
        stop_child = SPAWN.Event()
        parent = SPAWN.Process(
            target=_hold_slot_and_fork, args=(str(budget_dir), child_pid, ready, stop_child)
        )
        parent.start()
        try:
            assert ready.wait(PROCESS_WAIT)
            budget = make_budget(1)
            assert budget.try_acquire() is None

            os.kill(parent.pid, signal.SIGKILL)
            _wait_for_exit(parent)
            os.kill(child_pid.value, 0)  # raises if the forked child is gone
            slot = budget.acquire(timeout=ACQUIRE_WAIT)
        finally:
            stop_child.set()
            _stop_process(parent)

        assert parent.exitcode == -signal.SIGKILL
        assert slot.index == 0

    def test_child_contends_with_parent(self, make_budget):
        budget = make_budget(1)
        held = budget.try_acquire()
        receiver, sender = FORK.Pipe()

        def child_main() -> None:
            # The child uses the budget object it inherited.
            sender.send(budget.try_acquire() is None)
            sender.recv()  # wait until the parent released
            slot = budget.try_acquire()
            sender.send(slot is not None)
            sender.recv()  # hold the slot until the parent has checked

        child = FORK.Process(target=child_main)
        child.start()
        try:
            child_saw_full = receiver.recv() if receiver.poll(PROCESS_WAIT) else None
            held.release()
            receiver.send("released")
            child_acquired = receiver.recv() if receiver.poll(PROCESS_WAIT) else None
            parent_attempt = budget.try_acquire()
            receiver.send("done")
            child.join(PROCESS_WAIT)
        finally:
            _stop_process(child)

        assert child_saw_full is True
        assert child_acquired is True
        assert parent_attempt is None
        assert child.exitcode == 0
