"""Tests of ``BatchingLocalExecutor`` that need no running deployment."""

from __future__ import annotations

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
