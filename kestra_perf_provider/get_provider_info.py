"""Provider metadata read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    """Return the provider's metadata: name, versions, task decorator and config sections."""
    from kestra_perf_provider import __version__
    from kestra_perf_provider.dagrun_batching import settings as dagrun_batching_settings
    from kestra_perf_provider.namespace_files import settings as namespace_files_settings

    return {
        "package-name": "airflow-provider-kestra-perf",
        "name": "Kestra performance ideas",
        "description": (
            "Namespace files staged in parallel under a host-wide download budget, and task-state "
            "updates batched by DAG run."
        ),
        "versions": [__version__],
        "task-decorators": [
            {
                "name": "namespace_files",
                "class-name": "kestra_perf_provider.namespace_files.decorators.namespace_files_task",
            }
        ],
        "config": {
            namespace_files_settings.SECTION: namespace_files_settings.CONFIG_SECTION,
            dagrun_batching_settings.SECTION: dagrun_batching_settings.CONFIG_SECTION,
        },
    }
