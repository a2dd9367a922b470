from __future__ import annotations

import pytest

from kestra_perf_provider.config import ConfigSection
from kestra_perf_provider.dagrun_batching.exceptions import DagRunBatchingConfigError
from kestra_perf_provider.dagrun_batching.settings import CONFIG_SECTION, load_batching_settings
from kestra_perf_provider.get_provider_info import get_provider_info

SECTION = ConfigSection(
    "demo",
    {"options": {"size": {"default": "3"}, "flag": {"default": "False"}}},
    ValueError,
)


class TestConfigSection:
    def test_declared_default_when_unset(self):
        assert SECTION.read("size") == "3"

    def test_override_wins(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW__DEMO__SIZE", "7")
        assert SECTION.read("size", override=9) == 9
        assert SECTION.read("size") == "7"

    @pytest.mark.parametrize(("text", "expected"), [("yes", True), ("Off", False), (True, True)])
    def test_parse_bool(self, text, expected):
        assert SECTION.parse_bool("flag", text) is expected

    def test_invalid_names_option_and_variable(self):
        with pytest.raises(ValueError, match=r"Invalid \[demo\] size = 'x'.*AIRFLOW__DEMO__SIZE"):
            SECTION.parse_int("size", "x", 1, 10)

    @pytest.mark.parametrize("value", ["0", "11", "nan", "inf"])
    def test_out_of_range_rejected(self, value):
        with pytest.raises(ValueError, match="size"):
            SECTION.parse_float("size", value, 1, 10)


class TestDagRunBatchingSettings:
    def test_defaults(self):
        settings = load_batching_settings()
        assert settings.enabled is True
        assert settings.max_batch_size == 64
        assert settings.linger_seconds == pytest.approx(0.02)
        assert settings.fold_task_writes is True
        assert settings.max_write_hold_seconds == pytest.approx(1.0)
        assert settings.skip_start_heartbeat is True
        assert settings.xcom_read_ahead == 64

    def test_environment_overrides_folding(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW__DAGRUN_BATCHING__FOLD_TASK_WRITES", "False")
        monkeypatch.setenv("AIRFLOW__DAGRUN_BATCHING__XCOM_READ_AHEAD", "0")
        settings = load_batching_settings()
        assert settings.fold_task_writes is False
        assert settings.xcom_read_ahead == 0

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("LINGER_MS", "soon"),
            ("MAX_BATCH_SIZE", "0"),
            ("FALLBACK_TIMEOUT", "0"),
            ("ENABLED", "maybe"),
            ("FOLD_TASK_WRITES", "sometimes"),
            ("MAX_WRITE_HOLD_MS", "-1"),
            ("SKIP_START_HEARTBEAT", "2"),
            ("XCOM_READ_AHEAD", "10001"),
        ],
    )
    def test_invalid_value_rejected(self, monkeypatch, option, value):
        monkeypatch.setenv(f"AIRFLOW__DAGRUN_BATCHING__{option}", value)
        with pytest.raises(DagRunBatchingConfigError, match=f"AIRFLOW__DAGRUN_BATCHING__{option}"):
            load_batching_settings()


def test_provider_declares_both_sections():
    config = get_provider_info()["config"]
    assert set(config) == {"namespace_files", "dagrun_batching"}
    assert config["dagrun_batching"] is CONFIG_SECTION
    for section in config.values():
        for spec in section["options"].values():
            assert {"description", "version_added", "type", "example", "default"} <= set(spec)
