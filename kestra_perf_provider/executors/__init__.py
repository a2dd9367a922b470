"""Executors of the provider, selected with ``[core] executor = kestra_perf_provider.executors.<Name>``."""

from __future__ import annotations

from kestra_perf_provider.dagrun_batching.executor import BatchingLocalExecutor

__all__ = ["BatchingLocalExecutor"]
