"""The host download budget across real processes staging from one S3 server at once.

Each child process stages its own bucket, so the server's per-bucket maximum of GETs in flight is
the per-process maximum. The server holds every GET (``pause_object_gets``) until the expected
number are waiting together, which shows that the budget's number is reached without relying on
timing, and then releases them with a 30 ms latency each.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kestra_perf_provider.namespace_files import Namespace, stage_namespace_files
from kestra_perf_provider.namespace_files.budget import HostBudget
from kestra_perf_provider.namespace_files.settings import load_settings
from tests.namespace_files.processes_stage import finish_staging_process, start_staging_process
from tests.namespace_files.s3_tracking import TrackingS3Server

HOST_BUDGET = 8
TASK_CAP = 4
PROCESSES = 4
FILES_PER_NAMESPACE = 40
LATENCY_SECONDS = 0.03


@pytest.fixture(scope="module")
def server() -> Iterator[TrackingS3Server]:
    with TrackingS3Server() as server:
        yield server


@pytest.fixture(autouse=True)
def released_server(server: TrackingS3Server) -> Iterator[None]:
    server.clear_faults()
    server.resume_object_gets()
    server.set_get_latency(LATENCY_SECONDS)
    yield
    server.resume_object_gets()


def namespace_objects(index: int) -> dict[str, bytes]:
    return {
        f"d{number % 4}/f{number:03d}.txt": f"namespace {index} file {number}\n".encode()
        for number in range(FILES_PER_NAMESPACE)
    }


def staged_files(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file()
    }


def wait_until(condition: Any, description: str, timeout: float = 120) -> None:
    """Poll ``condition`` every 10 ms until it returns true.

    :raises TimeoutError: naming ``description`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting until {description}")
        time.sleep(0.01)


@pytest.mark.slow
class TestBudgetAcrossProcesses:
    def test_processes_share_host_budget(self, server: TrackingS3Server, tmp_path: Path) -> None:
        buckets = [server.create_bucket() for _ in range(PROCESSES)]
        for index, bucket in enumerate(buckets):
            server.put_objects(bucket, namespace_objects(index), prefix="ns/")
        server.pause_object_gets()
        server.reset_all_counters()
        assert server.tracker is not None

        processes = [
            start_staging_process(
                f"s3://{bucket}/ns",
                server.storage_options(),
                tmp_path / f"work-{index}",
                budget_dir=tmp_path / "budget",
                host_parallel_downloads=HOST_BUDGET,
                task_parallel_downloads=TASK_CAP,
            )
            for index, bucket in enumerate(buckets)
        ]
        try:
            # Every process has listed its bucket, so all of them compete for slots.
            wait_until(
                lambda: all(server.tracker.requests_by_bucket().get(bucket) for bucket in buckets),
                "every staging process listed its bucket",
            )
            wait_until(
                lambda: server.stats().object_gets_in_flight >= HOST_BUDGET,
                f"{HOST_BUDGET} object GETs were in flight at once",
            )
        finally:
            server.resume_object_gets()
            counts = [finish_staging_process(process) for process in processes]

        stats = server.stats()
        assert stats.max_object_gets_in_flight <= HOST_BUDGET
        assert stats.max_object_gets_in_flight == HOST_BUDGET
        per_bucket = server.tracker.max_in_flight_by_bucket()
        assert set(per_bucket) == set(buckets)
        for bucket in buckets:
            assert per_bucket[bucket] <= TASK_CAP, (bucket, per_bucket)
        for index, count in enumerate(counts):
            assert count["files"] == FILES_PER_NAMESPACE
            assert count["peak_in_flight"] <= TASK_CAP
            assert staged_files(tmp_path / f"work-{index}") == namespace_objects(index)
        assert stats.object_gets_total == PROCESSES * FILES_PER_NAMESPACE

    def test_killed_process_returns_its_slots(self, server: TrackingS3Server, tmp_path: Path) -> None:
        killed_bucket, next_bucket = server.create_bucket(), server.create_bucket()
        server.put_objects(killed_bucket, namespace_objects(0), prefix="ns/")
        server.put_objects(next_bucket, namespace_objects(1), prefix="ns/")
        budget_dir = tmp_path / "budget"
        server.pause_object_gets()
        server.reset_all_counters()

        process = start_staging_process(
            f"s3://{killed_bucket}/ns",
            server.storage_options(),
            tmp_path / "killed",
            budget_dir=budget_dir,
            host_parallel_downloads=HOST_BUDGET,
            task_parallel_downloads=HOST_BUDGET,
        )
        try:
            wait_until(
                lambda: server.stats().object_gets_in_flight >= HOST_BUDGET,
                f"the process to be killed held {HOST_BUDGET} GETs in flight",
            )
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL

        # The killed process's GETs stay held by the paused server; from here on only the new
        # staging's GETs are counted.
        server.reset_all_counters()
        outcome: dict[str, Any] = {}
        settings = load_settings(
            host_parallel_downloads=HOST_BUDGET,
            task_parallel_downloads=HOST_BUDGET,
            budget_dir=budget_dir,
            cache_enabled=False,
        )

        def stage() -> None:
            try:
                outcome["result"] = stage_namespace_files(
                    Namespace(f"s3://{next_bucket}/ns", storage_options=server.storage_options()),
                    tmp_path / "next",
                    settings=settings,
                )
            except BaseException as err:  # noqa: BLE001 - re-raised by the assertions below
                outcome["error"] = err

        thread = threading.Thread(target=stage, name="staging-after-kill", daemon=True)
        thread.start()
        try:
            wait_until(
                lambda: server.stats().object_gets_in_flight >= HOST_BUDGET or not thread.is_alive(),
                f"the next staging held {HOST_BUDGET} GETs in flight",
                timeout=60,
            )
            reached = server.stats().object_gets_in_flight
        finally:
            server.resume_object_gets()
            thread.join(timeout=120)

        assert "error" not in outcome, outcome.get("error")
        assert reached == HOST_BUDGET
        assert outcome["result"].files == FILES_PER_NAMESPACE
        assert staged_files(tmp_path / "next") == namespace_objects(1)
        probe = HostBudget(budget_dir, HOST_BUDGET)
        try:
            assert probe.slots_in_use() == 0
        finally:
            probe.close()
