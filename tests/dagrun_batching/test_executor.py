"""Tests of ``BatchingLocalExecutor`` that need no running deployment."""

from __future__ import annotations

import os
import subprocess

import pytest

from kestra_perf_provider.dagrun_batching.exceptions import DagRunBatchingConfigError
from kestra_perf_provider.executors import BatchingLocalExecutor


def test_invalid_setting_stops_start_cleanly(monkeypatch):
    monkeypatch.setenv("AIRFLOW__DAGRUN_BATCHING__XCOM_READ_AHEAD", "abc")
    executor = BatchingLocalExecutor(parallelism=2)

    with pytest.raises(DagRunBatchingConfigError, match="AIRFLOW__DAGRUN_BATCHING__XCOM_READ_AHEAD"):
        executor.start()

    # The scheduler calls end() on its way out; it must not raise an error of its own over the real one.
    executor.end()
    executor.terminate()
    assert executor.batching_active is False


def test_stale_socket_folders_removed(tmp_path):
    from kestra_perf_provider.dagrun_batching.executor import SOCKET_DIR_PREFIX, remove_stale_socket_dirs

    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f"{SOCKET_DIR_PREFIX}stale"
    live = tmp_path / f"{SOCKET_DIR_PREFIX}live"
    unknown = tmp_path / f"{SOCKET_DIR_PREFIX}starting"
    other = tmp_path / "unrelated"
    for folder, pid in ((stale, finished.pid), (live, os.getpid()), (unknown, None), (other, finished.pid)):
        folder.mkdir()
        (folder / "updates.sock").write_text("")
        if pid is not None:
            (folder / "scheduler.pid").write_text(str(pid))

    removed = remove_stale_socket_dirs(str(tmp_path))

    assert removed == [str(stale)]
    assert not stale.exists()
    # A live scheduler's folder, one still being created (no pid yet) and other folders stay.
    assert live.exists()
    assert unknown.exists()
    assert other.exists()
