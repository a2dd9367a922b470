from __future__ import annotations

import os

import pytest

from kestra_perf_provider.exceptions import NamespaceFilesConfigError
from kestra_perf_provider.namespace_files.settings import (
    CONFIG_SECTION,
    default_host_parallel_downloads,
    load_settings,
    parse_task_cap,
    usable_cpu_count,
)


class TestDeclaredOptions:
    @pytest.mark.parametrize("option", sorted(CONFIG_SECTION["options"]))
    def test_option_is_fully_described(self, option):
        spec = CONFIG_SECTION["options"][option]
        assert set(spec) >= {"description", "version_added", "type", "example", "default"}
        assert spec["description"].strip()
        assert spec["type"] in {"string", "integer", "float", "boolean"}


class TestDefaults:
    def test_usable_cores_within_affinity(self):
        assert 1 <= usable_cpu_count() <= len(os.sched_getaffinity(0))

    def test_default_budget_formula(self):
        assert default_host_parallel_downloads() == max(32, 4 * usable_cpu_count())

    def test_task_cap_is_half_the_budget(self):
        settings = load_settings(host_parallel_downloads=32)
        assert settings.task_parallel_downloads == 16

    def test_unset_budget_is_derived(self, monkeypatch):
        monkeypatch.delenv("AIRFLOW__NAMESPACE_FILES__HOST_PARALLEL_DOWNLOADS", raising=False)
        assert load_settings().host_parallel_downloads == default_host_parallel_downloads()


class TestTaskCap:
    @pytest.mark.parametrize(
        ("value", "budget", "expected"),
        [
            pytest.param("0.5", 32, 16, id="half"),
            pytest.param("0.25", 10, 2, id="fraction-rounds-down"),
            pytest.param("0.01", 10, 1, id="fraction-at-least-one"),
            pytest.param("1.0", 32, 32, id="whole-budget"),
            pytest.param("8", 32, 8, id="absolute"),
            pytest.param("64", 32, 32, id="absolute-capped-by-budget"),
            pytest.param(0.5, 20, 10, id="float-argument"),
            pytest.param(4, 20, 4, id="int-argument"),
        ],
    )
    def test_parsed(self, value, budget, expected):
        assert parse_task_cap(value, budget) == expected

    @pytest.mark.parametrize("value", ["0", "-2", "1.5", "0.0", "half", ""])
    def test_invalid_rejected(self, value):
        with pytest.raises(NamespaceFilesConfigError, match="task_parallel_downloads"):
            parse_task_cap(value, 32)


class TestEnvironmentOverrides:
    def test_environment_variable_wins(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW__NAMESPACE_FILES__HOST_PARALLEL_DOWNLOADS", "12")
        monkeypatch.setenv("AIRFLOW__NAMESPACE_FILES__TASK_PARALLEL_DOWNLOADS", "5")
        settings = load_settings()
        assert settings.host_parallel_downloads == 12
        assert settings.task_parallel_downloads == 5

    def test_argument_beats_environment(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW__NAMESPACE_FILES__TASK_PARALLEL_DOWNLOADS", "5")
        assert load_settings(host_parallel_downloads=40, task_parallel_downloads=0.5).task_parallel_downloads == 20

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("HOST_PARALLEL_DOWNLOADS", "many"),
            ("HOST_PARALLEL_DOWNLOADS", "0"),
            ("MAX_RETRIES", "-1"),
            ("RETRY_INITIAL_DELAY", "soon"),
            ("RETRY_MAX_DELAY", "nan"),
        ],
    )
    def test_invalid_value_names_option_and_variable(self, monkeypatch, option, value):
        monkeypatch.setenv(f"AIRFLOW__NAMESPACE_FILES__{option}", value)
        with pytest.raises(NamespaceFilesConfigError) as raised:
            load_settings()
        message = str(raised.value)
        assert f"[namespace_files] {option.lower()} = {value!r}" in message
        assert f"AIRFLOW__NAMESPACE_FILES__{option}" in message

    def test_max_delay_below_initial_rejected(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW__NAMESPACE_FILES__RETRY_INITIAL_DELAY", "5")
        monkeypatch.setenv("AIRFLOW__NAMESPACE_FILES__RETRY_MAX_DELAY", "1")
        with pytest.raises(NamespaceFilesConfigError, match="retry_max_delay"):
            load_settings()
