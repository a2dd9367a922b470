"""Benchmark: the host cache of namespace files, against the same staging without it.

Run from the repository root::

    python -m benchmarks.namespace_files_cache --files 200 --processes 20 --latency-ms 50 --repeat 5

A moto S3 server runs in a child process (``tests.support.s3_server``) with a fixed delay before
each object GET, and serves one namespace of ``--files`` small files. Two measurements:

* **Objects downloaded by concurrent tasks**: ``--processes`` task processes start at once, each
  staging the whole namespace into its own folder with the provider's defaults (host budget 32,
  per-task cap 16 on this machine), first without the cache, then with an empty shared cache.
  The server counts the object GETs it answers.
* **Cached against cold staging**: one staging into a fresh folder with an empty cache (cold),
  then one with every file cached (warm); medians over ``--repeat`` pairs, and the listing alone
  for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kestra_perf_provider.namespace_files import Namespace, stage_namespace_files
from kestra_perf_provider.namespace_files.settings import load_settings
from kestra_perf_provider.namespace_files.sources import list_namespace, open_filesystem
from tests.support.s3_server import S3TestServerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "ns/shared"


def run_processes(server: S3TestServerProcess, url: str, work: Path, processes: int, cache: bool) -> dict[str, Any]:
    """Start ``processes`` stagings at once and return the server's GET count and their timings."""
    server.reset_counters()
    specs = [
        {
            "url": url,
            "storage_options": server.storage_options(),
            "destination": str(work / f"task-{index}"),
            "settings": {
                "budget_dir": str(work / "budget"),
                "cache_dir": str(work / "cache"),
                "cache_enabled": cache,
            },
        }
        for index in range(processes)
    ]
    started = time.monotonic()
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.namespace_files.staging_worker", json.dumps(spec)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=900)
        if child.returncode != 0:
            raise RuntimeError(f"staging process failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    wall = time.monotonic() - started
    stats = server.stats()
    return {
        "gets": stats.object_gets_total,
        "wall": wall,
        "staging_median": statistics.median(result["seconds"] for result in results),
        "downloaded": sum(result["downloaded_files"] for result in results),
        "from_cache": sum(result["cached_files"] for result in results),
    }


def cold_and_warm(server: S3TestServerProcess, namespace: Namespace, work: Path, repeat: int) -> dict[str, Any]:
    cold, warm, listing = [], [], []
    for round_number in range(repeat):
        settings = load_settings(budget_dir=work / "budget", cache_dir=work / f"cache-{round_number}")
        server.reset_counters()
        cold_result = stage_namespace_files(namespace, work / f"cold-{round_number}", settings=settings)
        warm_result = stage_namespace_files(namespace, work / f"warm-{round_number}", settings=settings)
        if warm_result.downloaded_files or warm_result.cached_files != cold_result.files:
            raise RuntimeError(f"warm staging was not served by the cache: {warm_result}")
        cold.append(cold_result.seconds)
        warm.append(warm_result.seconds)
        fs = open_filesystem(namespace, max_connections=16)
        started = time.monotonic()
        list_namespace(fs, namespace, 0)
        listing.append(time.monotonic() - started)
    return {
        "cold": statistics.median(cold),
        "warm": statistics.median(warm),
        "listing": statistics.median(listing),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200, help="files in the namespace (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=20, help="concurrent task processes (default: %(default)s)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added latency per GET (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="cold/warm pairs (default: %(default)s)")
    args = parser.parse_args(argv)

    print("command: python -m benchmarks.namespace_files_cache " + shlex.join(sys.argv[1:]))
    print(f"cpus: {os.cpu_count()}, files: {args.files}, processes: {args.processes}, latency: {args.latency_ms} ms")
    with tempfile.TemporaryDirectory(prefix="nsf-cache-bench-") as scratch, S3TestServerProcess(
        get_latency_seconds=args.latency_ms / 1000
    ) as server:
        work = Path(scratch)
        bucket = server.create_bucket()
        server.put_objects(
            bucket, {f"dir{index % 8}/file{index:05d}.txt": os.urandom(2048) for index in range(args.files)}, prefix=PREFIX + "/"
        )
        url = f"s3://{bucket}/{PREFIX}"
        namespace = Namespace(url, storage_options=server.storage_options())

        without = run_processes(server, url, work / "without-cache", args.processes, cache=False)
        with_cache = run_processes(server, url, work / "with-cache", args.processes, cache=True)
        print()
        print(f"{args.processes} processes staging the same {args.files}-file namespace at once")
        print(f"{'':<14}{'objects downloaded':>20}{'from cache':>12}{'wall s':>9}{'median staging s':>18}")
        for name, row in (("without cache", without), ("with cache", with_cache)):
            print(
                f"{name:<14}{row['gets']:>20}{row['from_cache']:>12}{row['wall']:>9.2f}{row['staging_median']:>18.3f}"
            )
        print(f"objects downloaded: {with_cache['gets']} (target {args.files}, not {args.files * args.processes})")

        timing = cold_and_warm(server, namespace, work / "single", args.repeat)
        print()
        print(f"one staging, median of {args.repeat}: cold {timing['cold']:.3f} s, all cached {timing['warm']:.3f} s, "
              f"listing alone {timing['listing']:.3f} s")
        print(f"cached staging is {timing['cold'] / timing['warm']:.1f}x faster than cold (target 20x); "
              f"it takes {timing['warm'] / timing['listing']:.2f}x the listing time")


if __name__ == "__main__":
    main()
