"""Benchmark DAG-run batching against stock LocalExecutor on real Airflow deployments.

For each executor and repeat the driver starts a fresh deployment with
:mod:`tests.support.airflow_deployment`: a PostgreSQL database, the api-server, the
scheduler and the dag-processor. It runs a small warm-up DAG run, so first-request
imports stay out of the figures, and measures the idle transaction rate of each
component. Then it runs every scenario and prints one table per scenario with the
medians over ``--repeats`` and the ratio of each executor to stock.

Run from the repository root::

    python -m benchmarks.dagrun_batching --scenarios fanout,outlets --executors stock,batching

Per-task figures divide by the mapped task instances of the measured runs. Lock waits
are the waits of 1 ms or more from the PostgreSQL log (``log_lock_waits`` with
``deadlock_timeout = 1ms`` on the benchmark's database), or from 50 ms sampling when the
log cannot be read; "api->api" counts waits of an api-server backend on another
api-server backend, which are waits between task completions of the same DAG run
whenever a scenario has one producer run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from tests.support.airflow_deployment import SCENARIO_DAGS, AirflowDeployment, Figures

log = logging.getLogger("benchmarks.dagrun_batching")

EXECUTORS = {
    "stock": "LocalExecutor",
    "batching": "kestra_perf_provider.executors.BatchingLocalExecutor",
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One measured case: which DAG, how many runs at once, and the final state expected."""

    name: str
    dag_id: str
    conf: Callable[[int], dict[str, Any]]
    runs: int = 1
    expected_state: str = "success"


SCENARIOS = {
    "fanout": Scenario("fanout", "fanout", lambda n: {"n": n}),
    "barrier": Scenario("barrier", "barrier", lambda n: {"n": n, "barrier_period": 4}),
    "outlets": Scenario("outlets", "outlets", lambda n: {"n": n}),
    "outlets_barrier": Scenario(
        "outlets_barrier", "outlets_barrier", lambda n: {"n": n, "barrier_period": 4}
    ),
    "two_runs": Scenario("two_runs", "fanout", lambda n: {"n": n}, runs=2),
    "retries": Scenario("retries", "retries", lambda n: {"n": n}),
    # The slow task must still be running when the last item fails, so fail-fast stops it.
    "fail_fast": Scenario(
        "fail_fast",
        "fail_fast",
        lambda n: {"n": n, "slow_n": 2, "slow_seconds": 900},
        expected_state="failed",
    ),
}

# Rows of each table: label, function of the summary dict, unit format.
ROWS: list[tuple[str, Callable[[dict[str, Any]], float | None], str]] = [
    ("trigger-to-end s (queued_at to end_date)", lambda s: s["trigger_to_end_s"], "{:.1f}"),
    ("wall s (trigger call to wait return)", lambda s: s["wall_s"], "{:.1f}"),
    ("api-server transactions / TI", lambda s: s["api_server_tx_per_ti"], "{:.2f}"),
    ("scheduler transactions / TI", lambda s: s["scheduler_tx_per_ti"], "{:.2f}"),
    (
        "api-server + scheduler transactions / TI",
        lambda s: s["api_server_tx_per_ti"] + s["scheduler_tx_per_ti"],
        "{:.2f}",
    ),
    ("writing transactions / TI (server-wide)", lambda s: s.get("write_tx_per_ti"), "{:.2f}"),
    (
        "writing transactions / TI, minus idle rate",
        lambda s: s.get("write_tx_per_ti_net"),
        "{:.2f}",
    ),
    (
        "api-server statements / TI (all, with BEGIN/COMMIT)",
        lambda s: s["statements_per_ti"].get("api_server"),
        "{:.1f}",
    ),
    (
        "scheduler statements / TI (all, with BEGIN/COMMIT)",
        lambda s: s["statements_per_ti"].get("scheduler"),
        "{:.1f}",
    ),
    ("lock waits >= 1 ms", lambda s: s["lock_waits"], "{:.0f}"),
    ("lock wait total ms", lambda s: s["lock_wait_ms"], "{:.0f}"),
    ("lock waits api->api", lambda s: s["lock_waits_api_on_api"], "{:.0f}"),
    ("deadlocks", lambda s: s["deadlocks"], "{:.0f}"),
    ("CPU s api-server", lambda s: s["cpu_s"].get("api_server"), "{:.1f}"),
    ("CPU s scheduler", lambda s: s["cpu_s"].get("scheduler"), "{:.1f}"),
    ("CPU s executor workers (supervisors)", lambda s: s["cpu_s"].get("executor_workers"), "{:.1f}"),
    ("CPU s task processes", lambda s: s["cpu_s"].get("task_processes"), "{:.1f}"),
    ("CPU s dag-processor", lambda s: s["cpu_s"].get("dag_processor"), "{:.1f}"),
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every option has a default that runs the full stock and batching set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run, from {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--n", type=int, default=100, help="mapped tasks per scenario (default: 100)")
    parser.add_argument(
        "--fanout-n",
        default="300",
        help="extra sizes of the fanout scenario, comma-separated; empty for none (default: 300)",
    )
    parser.add_argument("--with-1000", action="store_true", help="also run fanout with 1000 mapped tasks")
    parser.add_argument(
        "--executors",
        default=None,
        help="comma-separated executors: stock, batching, or an import path "
        "(default: stock,batching when BatchingLocalExecutor imports, else stock)",
    )

    parser.add_argument("--repeats", type=int, default=1, help="measured runs per case; tables show medians")
    parser.add_argument("--parallelism", type=int, default=32, help="[core] parallelism (default: 32)")
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="idle window per deployment (default: 5)"
    )
    parser.add_argument(
        "--run-timeout", type=float, default=900.0, help="seconds one case may take (default: 900)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=90.0,
        help="skip the remaining cases after this many minutes (default: 90)",
    )
    parser.add_argument(
        "--fresh-per-scenario",
        action="store_true",
        help="start a new deployment for every scenario instead of one per executor and repeat",
    )

    parser.add_argument("--json", help="write every figure to this file as JSON")
    parser.add_argument("--verbose", action="store_true", help="log the harness's progress")
    return parser.parse_args(argv)


def batching_importable() -> bool:
    """Return whether the batching executor imports, checked in a subprocess with a throwaway AIRFLOW_HOME."""
    with tempfile.TemporaryDirectory() as home:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import {EXECUTORS['batching'].rsplit('.', 1)[0]} as m; m.BatchingLocalExecutor",
            ],
            env={**os.environ, "AIRFLOW_HOME": home},
            capture_output=True,
            timeout=120,
            check=False,
        )
    return result.returncode == 0


def resolve_executors(option: str | None) -> list[tuple[str, str]]:
    if option is None:
        names = ["stock", "batching"] if batching_importable() else ["stock"]
        if names == ["stock"]:
            print("# BatchingLocalExecutor does not import; running stock LocalExecutor only")
    else:
        names = [name.strip() for name in option.split(",") if name.strip()]
    executors = []
    for name in names:
        executors.append((name, EXECUTORS.get(name, name)))
    return executors


def cases(args: argparse.Namespace) -> list[tuple[Scenario, int]]:
    selected = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    result = [(SCENARIOS[name], args.n) for name in selected]
    if "fanout" in selected:
        extra = [int(value) for value in args.fanout_n.split(",") if value.strip()]
        if args.with_1000:
            extra.append(1000)
        result += [(SCENARIOS["fanout"], n) for n in extra if n != args.n]
    return result


def run_case(
    deployment: AirflowDeployment, scenario: Scenario, n: int, *, idle: dict[str, float], timeout: float
) -> Figures:
    """Trigger one scenario, wait for it, and return its figures; raise if it ends in the wrong state."""
    conf = scenario.conf(n)
    with deployment.measure(idle_rates=idle) as measurement:
        run_ids = [deployment.trigger(scenario.dag_id, conf=conf) for _ in range(scenario.runs)]
        states = [deployment.wait_for_run(scenario.dag_id, run_id, timeout=timeout) for run_id in run_ids]
    wrong = [(run_id, state) for run_id, state in zip(run_ids, states) if state != scenario.expected_state]
    if wrong:
        raise RuntimeError(
            f"scenario {scenario.name} N={n}: runs ended {wrong}, expected {scenario.expected_state!r}; "
            f"logs in {deployment.home}"
        )
    deployment.wait_quiet(timeout=timeout)
    assert measurement.figures is not None
    return measurement.figures


def start_deployment(executor: str, args: argparse.Namespace) -> tuple[AirflowDeployment, dict[str, float]]:
    deployment = AirflowDeployment(executor=executor, dags_folder=SCENARIO_DAGS, parallelism=args.parallelism)
    deployment.__enter__()
    try:
        warm_up = deployment.trigger("fanout", conf={"n": 5})
        deployment.wait_for_run("fanout", warm_up, timeout=args.run_timeout)
        deployment.wait_quiet()
        idle = deployment.measure_idle(args.idle_seconds) if args.idle_seconds > 0 else {}
    except BaseException:
        deployment.__exit__(*sys.exc_info())
        raise
    return deployment, idle


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None and not math.isnan(value)]
    return statistics.median(present) if present else None


def format_value(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    if base == 0:
        return "=" if value == 0 else "new"
    return f"{value / base:.2f}"


def print_table(title: str, summaries: dict[str, list[dict[str, Any]]]) -> None:
    """Print one scenario's medians by executor, with ratios to the first executor."""
    names = list(summaries)
    rows = list(ROWS)
    routes = sorted(
        {route for runs in summaries.values() for run in runs for route in run["api_requests_per_ti"]}
    )

    rows += [
        (f"requests / TI {route}", lambda s, route=route: s["api_requests_per_ti"].get(route, 0.0), "{:.2f}")
        for route in routes
    ]

    header = ["metric", *names, *[f"{name}/{names[0]}" for name in names[1:]]]
    lines = []
    for label, getter, fmt in rows:
        medians = [median([getter(run) for run in summaries[name]]) for name in names]
        cells = [format_value(value, fmt) for value in medians]
        ratios = [format_ratio(value, medians[0]) for value in medians[1:]]
        lines.append([label, *cells, *ratios])

    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    print(f"\n### {title}")
    print("| " + " | ".join(cell.ljust(width) for cell, width in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for line in lines:
        print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) + " |")

    for name in names:
        pairs: Counter[str] = Counter()
        for run in summaries[name]:
            pairs.update(run["lock_wait_pairs"])
        if pairs:
            listed = "; ".join(f"{pair} x{count}" for pair, count in pairs.most_common())
            print(f"lock waits {name}, summed over {len(summaries[name])} runs: {listed}")

    for name in names:
        idle = [
            run["idle_transactions_per_s"] for run in summaries[name] if run.get("idle_transactions_per_s")
        ]
        if idle:
            rates = {key: median([rates.get(key) for rates in idle]) for key in sorted(idle[0])}
            print(
                f"idle transactions/s {name}: "
                + ", ".join(f"{key} {value:.1f}" for key, value in rates.items())
            )


def print_header(args: argparse.Namespace, executors: list[tuple[str, str]]) -> None:
    print("# DAG-run batching benchmark")
    print("command: python -m benchmarks.dagrun_batching " + shlex.join(sys.argv[1:]))
    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; apache-airflow {importlib.metadata.version('apache-airflow')}; "
        f"python {platform.python_version()}; {os.cpu_count()} CPUs; parallelism {args.parallelism}; "
        f"repeats {args.repeats} (medians)"
    )
    print("executors: " + ", ".join(f"{name}={path}" for name, path in executors))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    executors = resolve_executors(args.executors)
    selected = cases(args)
    print_header(args, executors)

    deadline = time.monotonic() + args.max_minutes * 60
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    raw: list[dict[str, Any]] = []
    skipped: list[str] = []
    for repeat in range(args.repeats):
        for name, executor in executors:
            groups = [[case] for case in selected] if args.fresh_per_scenario else [selected]
            for group in groups:
                if time.monotonic() >= deadline:
                    skipped += [f"{scenario.name} N={n} {name} repeat {repeat + 1}" for scenario, n in group]
                    continue
                deployment, idle = start_deployment(executor, args)
                try:
                    for scenario, n in group:
                        title = f"{scenario.name} N={n}"
                        if time.monotonic() >= deadline:
                            skipped.append(f"{title} {name} repeat {repeat + 1}")
                            continue
                        figures = run_case(deployment, scenario, n, idle=idle, timeout=args.run_timeout)
                        summary = figures.summary()
                        summary["idle_transactions_per_s"] = idle
                        results.setdefault(title, {}).setdefault(name, []).append(summary)
                        raw.append(
                            {"case": title, "executor": name, "repeat": repeat + 1, "summary": summary}
                        )
                        print(
                            f"# {title} {name} repeat {repeat + 1}: trigger-to-end "
                            f"{format_value(summary['trigger_to_end_s'], '{:.1f}')} s, api-server tx/TI "
                            f"{summary['api_server_tx_per_ti']:.2f}, lock waits {summary['lock_waits']}",
                            flush=True,
                        )
                finally:
                    deployment.__exit__(None, None, None)

    for title, summaries in results.items():
        print_table(title, summaries)
    if skipped:
        print(f"\nskipped after --max-minutes {args.max_minutes}: " + "; ".join(skipped))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(raw, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
