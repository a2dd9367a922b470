"""Run one namespace-file staging in a child process, for tests of the host-wide budget.

Run as ``python -m tests.namespace_files.processes_stage REQUEST`` from the repository root,
where REQUEST is the JSON object that :func:`start_staging_process` builds. The child prints one
JSON line with the counts of its :class:`StagingResult` and exits with status 0, or lets the error
end it with a traceback on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_staging_process(
    url: str,
    storage_options: dict[str, Any],
    destination: Path,
    *,
    budget_dir: Path,
    host_parallel_downloads: int,
    task_parallel_downloads: int,
) -> subprocess.Popen[str]:
    """Start a child process that stages the namespace ``url`` into ``destination``."""
    request = {
        "url": url,
        "storage_options": storage_options,
        "destination": str(destination),
        "budget_dir": str(budget_dir),
        "host_parallel_downloads": host_parallel_downloads,
        "task_parallel_downloads": task_parallel_downloads,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.namespace_files.processes_stage", json.dumps(request)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_staging_process(process: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    """Wait for a child started by :func:`start_staging_process` and return its counts.

    :raises AssertionError: the child failed; the message holds the end of its stderr.
    """
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, (
        f"staging process {process.pid} exited {process.returncode}:\n{stderr[-3000:]}"
    )
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from kestra_perf_provider.namespace_files import Namespace, stage_namespace_files
    from kestra_perf_provider.namespace_files.settings import load_settings

    request = json.loads((argv or sys.argv[1:])[0])
    settings = load_settings(
        host_parallel_downloads=request["host_parallel_downloads"],
        task_parallel_downloads=request["task_parallel_downloads"],
        budget_dir=request["budget_dir"],
        # Every listed file must be a GET on the server, whatever an earlier run cached.
        cache_enabled=False,
    )
    result = stage_namespace_files(
        Namespace(request["url"], storage_options=request["storage_options"]),
        request["destination"],
        settings=settings,
    )
    counts = {"files": result.files, "bytes": result.bytes, "peak_in_flight": result.peak_in_flight}
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
