"""Benchmark: stage N small namespace files from S3 with five download methods.

Run from the repository root::

    python -m benchmarks.namespace_files_staging --sizes 200,2000 --latency-ms 50,0 --repeat 3

A moto S3 server runs in a child process (``tests.support.s3_server``) with a fixed
delay before each object GET, so that moto's CPU time does not share this process's
GIL or CPU account. Each method stages ``s3://BUCKET/ns/team-a/`` (N files of
1-8 KiB in 16 folders) into a new empty directory, with a new filesystem object
so that no listing cache or open connection carries over between repetitions:

* ``sequential``: list, then s3fs ``get_file`` one file at a time, as a loop over
  ``S3Hook.download_file`` does.
* ``fsspec_get``: ``fs.get(prefix, dest, recursive=True)`` with s3fs defaults (10
  pooled connections), as ``ObjectStoragePath.copy`` does.
* ``s3fs_16``: the same call with 16 pooled connections and ``batch_size=16``.
* ``s5cmd``: ``s5cmd --numworkers 16 cp 's3://BUCKET/ns/team-a/*' DEST/``.
* ``provider``: ``stage_namespace_files`` of this provider with its default settings,
  except for a new empty host cache per run, so that every file is downloaded.
* ``provider_warm``: the same with a host cache that already holds every file, as for
  a repeated staging on one host; not part of the targets.

The ideal time of a parallel method is the listing time (measured on its own) plus
``ceil(N / 16)`` rounds of the GET latency. Each run is checked for correctness:
all N files at the right relative paths with the right content.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.support.s3_server import (
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    S3TestServerProcess,
)

PREFIX = "ns/team-a/"
PARALLELISM = 16
FOLDERS = 16
METHODS = ("sequential", "fsspec_get", "s3fs_16", "s5cmd", "provider", "provider_warm")
PROFILED_METHODS = ("fsspec_get", "s3fs_16", "provider")
S5CMD = Path(sys.executable).with_name("s5cmd")


@dataclasses.dataclass
class RunMeasurement:
    wall: float
    client_cpu: float
    server_cpu: float
    object_gets: int
    other_requests: int
    max_in_flight: int
    #: Seconds from the start to the first object GET reaching the server.
    before_first_get: float = math.nan
    #: Seconds from the first object GET's arrival to the end of the last one.
    get_phase: float = math.nan
    #: Sum of the server-side durations of all object GETs, latency included.
    get_seconds_total: float = math.nan
    error: str | None = None
    provider_peak: int | None = None


@dataclasses.dataclass
class MethodSummary:
    method: str
    n: int
    latency_ms: float
    runs: list[RunMeasurement]

    @property
    def ok_runs(self) -> list[RunMeasurement]:
        return [run for run in self.runs if run.error is None]

    def median(self, field: str) -> float:
        values = [getattr(run, field) for run in self.ok_runs]
        return statistics.median(values) if values else math.nan


@dataclasses.dataclass
class Dataset:
    bucket: str
    n: int
    expected: dict[str, str]  # relative path -> sha256 of content
    sizes: dict[str, int]


class StagingContext:
    """Inputs of one staging run: the server, the dataset and a new empty destination."""

    def __init__(self, server: S3TestServerProcess, dataset: Dataset, destination: Path) -> None:
        self.server = server
        self.dataset = dataset
        self.destination = destination
        self.work_root = destination.parent

    @property
    def remote_prefix(self) -> str:
        return f"{self.dataset.bucket}/{PREFIX}"


# -- staging methods -----------------------------------------------------------------------


def stage_sequential(context: StagingContext) -> None:
    fs = context.server.s3fs_filesystem()
    for remote_path in fs.find(context.remote_prefix):
        local_path = context.destination / remote_path[len(context.remote_prefix) :]
        local_path.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote_path, str(local_path))


def stage_fsspec_get(context: StagingContext) -> None:
    fs = context.server.s3fs_filesystem()
    # Trailing slashes on both sides copy the contents of the prefix into the destination.
    fs.get(context.remote_prefix, f"{context.destination}/", recursive=True)


def stage_s3fs_16(context: StagingContext) -> None:
    fs = context.server.s3fs_filesystem(max_pool_connections=PARALLELISM)
    fs.get(context.remote_prefix, f"{context.destination}/", recursive=True, batch_size=PARALLELISM)


def stage_s5cmd(context: StagingContext) -> None:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY,
        "AWS_REGION": TEST_REGION,
    }
    command = [
        str(S5CMD),
        "--endpoint-url",
        context.server.endpoint_url,
        "--numworkers",
        str(PARALLELISM),
        "--log",
        "error",
        "cp",
        f"s3://{context.remote_prefix}*",
        f"{context.destination}/",
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"s5cmd exited with {completed.returncode}: {completed.stderr.strip()[:500]}")


def _stage_with_provider(context: StagingContext, cache_dir: Path) -> Any:
    from kestra_perf_provider.namespace_files import Namespace, stage_namespace_files
    from kestra_perf_provider.namespace_files.settings import load_settings

    namespace = Namespace(f"s3://{context.remote_prefix}", storage_options=context.server.storage_options())
    settings = load_settings(cache_dir=cache_dir)
    return stage_namespace_files([namespace], destination=context.destination, settings=settings)


def stage_provider(context: StagingContext) -> Any:
    # A new empty host cache per run makes every file a download, as on a host's first
    # staging, which is what the other methods do every time.
    return _stage_with_provider(context, context.destination.with_name(f"{context.destination.name}-cache"))


def stage_provider_warm(context: StagingContext) -> Any:
    # The cache that warm_up() filled for this dataset: a repeated staging on the same host.
    return _stage_with_provider(context, context.work_root / f"warm-cache-{context.dataset.bucket}")


STAGERS: dict[str, Callable[[StagingContext], Any]] = {
    "sequential": stage_sequential,
    "fsspec_get": stage_fsspec_get,
    "s3fs_16": stage_s3fs_16,
    "s5cmd": stage_s5cmd,
    "provider": stage_provider,
    "provider_warm": stage_provider_warm,
}


# -- measurement ---------------------------------------------------------------------------


def make_dataset(server: S3TestServerProcess, n: int, seed: int, label: str = "data") -> Dataset:
    rng = random.Random(seed)
    objects: dict[str, bytes] = {}
    for index in range(n):
        relative = f"folder-{index % FOLDERS:02d}/file-{index:05d}.txt"
        objects[relative] = rng.randbytes(rng.randint(1024, 8 * 1024))
    bucket = server.create_bucket(f"bench-{label}-{n}-{os.getpid()}")
    server.put_objects(bucket, objects, prefix=PREFIX, workers=8)
    return Dataset(
        bucket=bucket,
        n=n,
        expected={key: hashlib.sha256(body).hexdigest() for key, body in objects.items()},
        sizes={key: len(body) for key, body in objects.items()},
    )


def check_staged(destination: Path, dataset: Dataset) -> str | None:
    """Return why the staged tree differs from the dataset, or ``None`` when it matches."""
    found = {str(path.relative_to(destination)): path for path in destination.rglob("*") if path.is_file()}
    missing = sorted(set(dataset.expected) - set(found))
    extra = sorted(set(found) - set(dataset.expected))
    if missing or extra:
        return f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
    for relative, path in found.items():
        size = path.stat().st_size
        if size != dataset.sizes[relative]:
            return f"{relative}: {size} bytes, expected {dataset.sizes[relative]}"
        if hashlib.sha256(path.read_bytes()).hexdigest() != dataset.expected[relative]:
            return f"{relative}: content differs from the uploaded object"
    return None


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(server: S3TestServerProcess, dataset: Dataset, method: str, work_root: Path) -> RunMeasurement:
    """Stage the dataset once with ``method`` and return its timings, counters and correctness."""
    destination = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=work_root))
    context = StagingContext(server, dataset, destination)

    server.reset_counters()
    cpu_before = time.process_time() + children_cpu()
    started = time.perf_counter()
    error = None
    result = None
    try:
        result = STAGERS[method](context)
    except Exception as err:  # noqa: BLE001 - reported in the table; the other methods still run
        error = f"{type(err).__name__}: {err}"[:300]
    wall = time.perf_counter() - started
    client_cpu = time.process_time() + children_cpu() - cpu_before
    stats = server.stats()

    if error is None:
        error = check_staged(destination, dataset)
    shutil.rmtree(destination, ignore_errors=True)
    shutil.rmtree(destination.with_name(f"{destination.name}-cache"), ignore_errors=True)
    return RunMeasurement(
        wall=wall,
        client_cpu=client_cpu,
        server_cpu=stats.process_cpu_seconds,
        object_gets=stats.object_gets_total,
        other_requests=stats.requests_total - stats.object_gets_total,
        max_in_flight=stats.max_object_gets_in_flight,
        before_first_get=_or_nan(stats.first_object_get_seconds),
        get_phase=_or_nan(stats.last_object_get_done_seconds) - _or_nan(stats.first_object_get_seconds),
        get_seconds_total=stats.object_get_seconds_total,
        error=error,
        provider_peak=getattr(result, "peak_in_flight", None),
    )


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def measure_listing(server: S3TestServerProcess, dataset: Dataset, repeat: int) -> float:
    """Median time to create a new s3fs filesystem and list the prefix recursively."""
    timings = []
    for _ in range(max(5, repeat)):
        started = time.perf_counter()
        found = server.s3fs_filesystem().find(f"{dataset.bucket}/{PREFIX}")
        timings.append(time.perf_counter() - started)
        if len(found) != dataset.n:
            raise RuntimeError(f"listing found {len(found)} files, expected {dataset.n}")
    return statistics.median(timings)


def warm_up(server: S3TestServerProcess, dataset: Dataset, methods: list[str], work_root: Path) -> None:
    """Run each method once, unmeasured, so that imports and first-use setup stay out of the timings."""
    server.set_get_latency(0.0)
    for method in methods:
        run = measure(server, dataset, method, work_root)
        if run.error is not None:
            print(f"  warm-up of {method} failed: {run.error}", flush=True)


def repetitions(method: str, n: int, latency_ms: float, args: argparse.Namespace) -> int:
    # A sequential loop pays the latency N times; cap its repetitions so that the
    # whole default run stays bounded.
    if method == "sequential" and n * latency_ms / 1000 > args.sequential_max_seconds:
        return 1
    return args.repeat


# -- reporting -----------------------------------------------------------------------------


def header(args: argparse.Namespace) -> str:
    s5cmd_version = subprocess.run(
        [str(S5CMD), "version"], check=False, capture_output=True, text=True
    ).stdout.strip()
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("s3fs", "fsspec", "aiobotocore", "botocore", "moto")
    )
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return "\n".join(
        [
            "# Namespace files: parallel staging benchmark",
            f"command: {shlex.join([sys.executable, '-m', 'benchmarks.namespace_files_staging', *sys.argv[1:]])}",
            f"date: {datetime.now(UTC).isoformat(timespec='seconds')}",
            (
                f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load} at start; "
                f"Python {platform.python_version()}"
            ),
            f"versions: {versions}, s5cmd {s5cmd_version}",
            (
                f"sizes: {args.sizes}; GET latency ms: {args.latency_ms}; repeat: {args.repeat} "
                f"(sequential: 1 when N x latency > {args.sequential_max_seconds:g} s); "
                f"methods: {', '.join(args.methods)}"
            ),
        ]
    )


def print_results(summaries: list[MethodSummary], listing: dict[tuple[int, float], float]) -> None:
    by_key = {(s.n, s.latency_ms, s.method): s for s in summaries}
    print()
    print("## Medians")
    print(
        "| latency ms | N | method | runs | median s | speed-up vs sequential | x ideal | files/s "
        "| max GETs in flight | requests/file | correct |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for summary in summaries:
        n, latency = summary.n, summary.latency_ms
        median = summary.median("wall")
        sequential = by_key.get((n, latency, "sequential"))
        speed_up = sequential.median("wall") / median if sequential and sequential.ok_runs else math.nan
        ideal = listing[(n, latency)] + math.ceil(n / PARALLELISM) * latency / 1000
        requests = summary.median("object_gets") + summary.median("other_requests")
        errors = [run.error for run in summary.runs if run.error]
        correct = "yes" if not errors else f"NO: {errors[0]}"
        # The ideal assumes 16 parallel GETs, which a sequential loop never attempts.
        versus_ideal = "-" if summary.method == "sequential" else f"{median / ideal:.2f}"
        print(
            f"| {latency:g} | {n} | {summary.method} | {len(summary.runs)} | {median:.2f} | {speed_up:.1f}x "
            f"| {versus_ideal} | {n / median:.0f} | {summary.median('max_in_flight'):.0f} "
            f"| {requests / n:.2f} | {correct} |"
        )
    print()
    print("ideal = listing + ceil(N / 16) x latency; listing medians (new filesystem + recursive find):")
    for (n, latency), seconds in sorted(listing.items()):
        ideal = seconds + math.ceil(n / PARALLELISM) * latency / 1000
        print(f"  latency {latency:g} ms, N={n}: listing {seconds:.3f} s, ideal {ideal:.2f} s")


def print_profile(summaries: list[MethodSummary]) -> None:
    print()
    print("## Where the time goes (medians)")
    print("Per file, in ms: client CPU is this process plus its child processes; server CPU is the moto")
    print("server process; waiting = wall - client CPU. CPU use = (client + server CPU) / wall (2 cores).")
    print("Phases, timed by the server: before the first object GET arrives (client setup and listing),")
    print("the GET phase until the last GET ends, and the tail after it (e.g. renames); the GET phase is")
    print("also shown against its ideal ceil(N / 16) x latency. Mean in flight = sum of GET durations at")
    print("the server / GET phase; GET ms = mean duration of one GET at the server, latency included.")
    print(
        "| latency ms | N | method | wall/file | client CPU/file | server CPU/file | waiting/file | CPU use "
        "| before 1st GET s | GET phase s | GET phase x ideal | tail s | mean in flight | GET ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for summary in summaries:
        n, latency = summary.n, summary.latency_ms
        wall, client, server = (summary.median(field) for field in ("wall", "client_cpu", "server_cpu"))
        before, phase = summary.median("before_first_get"), summary.median("get_phase")
        get_seconds = summary.median("get_seconds_total")
        ideal_phase = math.ceil(n / PARALLELISM) * latency / 1000
        versus_ideal = f"{phase / ideal_phase:.2f}" if ideal_phase else "-"
        print(
            f"| {latency:g} | {n} | {summary.method} | {wall / n * 1000:.2f} | {client / n * 1000:.2f} "
            f"| {server / n * 1000:.2f} | {(wall - client) / n * 1000:.2f} | {(client + server) / wall:.2f} "
            f"| {before:.3f} | {phase:.3f} | {versus_ideal} | {wall - before - phase:.3f} "
            f"| {get_seconds / phase:.1f} | {get_seconds / summary.median('object_gets') * 1000:.1f} |"
        )


def print_targets(summaries: list[MethodSummary]) -> None:
    by_key = {(s.n, s.latency_ms, s.method): s for s in summaries}
    lines = []
    for summary in summaries:
        if summary.method != "provider" or summary.latency_ms == 0:
            continue
        provider = summary.median("wall")
        for other, factor, wording in (
            ("s5cmd", 1.0, "at least as fast as s5cmd"),
            ("fsspec_get", 1.5, "at least 1.5x faster than fsspec get"),
        ):
            reference = by_key.get((summary.n, summary.latency_ms, other))
            if reference is None or not reference.ok_runs or not summary.ok_runs:
                lines.append(f"  N={summary.n}, {summary.latency_ms:g} ms: {wording}: not measured")
                continue
            ratio = reference.median("wall") / provider
            verdict = "met" if ratio >= factor else "MISSED"
            lines.append(
                f"  N={summary.n}, {summary.latency_ms:g} ms: {wording}: {verdict} "
                f"({other} {reference.median('wall'):.2f} s / provider {provider:.2f} s = {ratio:.2f}x)"
            )
    if lines:
        print()
        print("## Targets")
        print("\n".join(lines))


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="200,2000", help="comma-separated file counts N (default: %(default)s)"
    )
    parser.add_argument(
        "--latency-ms",
        default="50,0",
        help="comma-separated delays added before each object GET, in milliseconds (default: %(default)s)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per method (default: %(default)s)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--sequential-max-seconds",
        type=float,
        default=20.0,
        help="run the sequential method once when N x latency exceeds this many seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=900.0,
        help="skip the remaining measurements once this many seconds have passed (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated file sizes and contents")
    args = parser.parse_args(argv)
    args.sizes = [int(value) for value in args.sizes.split(",") if value]
    args.latency_ms = [float(value) for value in args.latency_ms.split(",") if value]
    args.methods = [value.strip() for value in args.methods.split(",") if value.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # One summary line per staging would interleave with the progress lines.
    logging.getLogger("kestra_perf_provider").setLevel(logging.WARNING)
    print(header(args), flush=True)
    started = time.monotonic()
    summaries: list[MethodSummary] = []
    listing: dict[tuple[int, float], float] = {}
    skipped: list[str] = []
    warm_caches: set[int] = set()
    with S3TestServerProcess() as server, tempfile.TemporaryDirectory(prefix="ns-staging-bench-") as work:
        datasets = {n: make_dataset(server, n, args.seed + n) for n in args.sizes}
        print(f"uploaded {sum(args.sizes)} objects in {time.monotonic() - started:.1f} s", flush=True)
        warm_up(
            server, make_dataset(server, PARALLELISM, args.seed, label="warm-up"), args.methods, Path(work)
        )
        for latency in args.latency_ms:
            server.set_get_latency(latency / 1000)
            for n in args.sizes:
                dataset = datasets[n]
                listing[(n, latency)] = measure_listing(server, dataset, args.repeat)
                if "provider_warm" in args.methods and n not in warm_caches:
                    fill = measure(server, dataset, "provider_warm", Path(work))
                    print(f"  filled the warm cache for N={n}: {fill.error or 'ok'}", flush=True)
                    warm_caches.add(n)
                group = {method: MethodSummary(method, n, latency, []) for method in args.methods}
                # Methods take turns within each repetition, so that a burst of load from
                # other processes on the machine does not fall on one method only.
                for repetition in range(args.repeat):
                    for method in args.methods:
                        if repetition >= repetitions(method, n, latency, args):
                            continue
                        if time.monotonic() - started > args.time_budget_s:
                            skipped.append(
                                f"{method} N={n} latency={latency:g} ms repetition {repetition + 1}"
                            )
                            continue
                        run = measure(server, dataset, method, Path(work))
                        group[method].runs.append(run)
                        status = "ok" if run.error is None else f"FAILED: {run.error}"
                        print(
                            f"  latency {latency:g} ms N={n} {method}: {run.wall:.2f} s, "
                            f"max in flight {run.max_in_flight}, {status}",
                            flush=True,
                        )
                summaries.extend(summary for summary in group.values() if summary.runs)
    print_results(summaries, listing)
    print_profile([s for s in summaries if s.method in PROFILED_METHODS or s.method == "s5cmd"])
    print_targets(summaries)
    if skipped:
        print(f"\nskipped after the {args.time_budget_s:g} s budget: {'; '.join(skipped)}")
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
