"""The host cache of namespace files, against the moto S3 server, counting the GETs it serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kestra_perf_provider.namespace_files import Namespace, stage_namespace_files
from kestra_perf_provider.namespace_files.budget import HostBudget
from kestra_perf_provider.namespace_files.cache import NamespaceCache, cache_key, expected_md5, parse_size
from kestra_perf_provider.namespace_files.settings import load_settings
from kestra_perf_provider.namespace_files.sources import list_namespace, open_filesystem
from kestra_perf_provider.namespace_files.transfer import IncompleteDownloadError
from tests.conftest import REPO_ROOT

FILES = {f"dir{index % 4}/file{index:03d}.txt": f"content {index}\n".encode() * 20 for index in range(40)}


@pytest.fixture
def namespace(s3_bucket):
    s3_bucket.put_objects(FILES, prefix="ns/")
    return Namespace(s3_bucket.url("ns"), storage_options=s3_bucket.server.storage_options())


@pytest.fixture
def settings_for(tmp_path):
    def make(**overrides):
        options = {
            "host_parallel_downloads": 8,
            "task_parallel_downloads": 4,
            "budget_dir": tmp_path / "budget",
            "cache_dir": tmp_path / "cache",
            "max_retries": 2,
        }
        options.update(overrides)
        return load_settings(**options)

    return make


def staged(directory):
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def cache_entries(cache_dir):
    return [path for path in (cache_dir / "objects").rglob("*") if path.is_file()]


class TestHits:
    def test_second_staging_downloads_nothing(self, s3_bucket, namespace, settings_for, tmp_path):
        first = stage_namespace_files(namespace, tmp_path / "one", settings=settings_for())
        gets_after_first = s3_bucket.server.stats().object_gets_total
        second = stage_namespace_files(namespace, tmp_path / "two", settings=settings_for())
        assert gets_after_first == len(FILES)
        assert s3_bucket.server.stats().object_gets_total == len(FILES)
        assert first.downloaded_files == len(FILES)
        assert second.cached_files == len(FILES)
        assert second.downloaded_bytes == 0
        assert staged(tmp_path / "two") == FILES

    def test_changed_object_downloaded_again(self, s3_bucket, namespace, settings_for, tmp_path):
        stage_namespace_files(namespace, tmp_path / "one", settings=settings_for())
        s3_bucket.put_objects({"dir1/file001.txt": b"new content"}, prefix="ns/")
        s3_bucket.server.reset_counters()
        result = stage_namespace_files(namespace, tmp_path / "two", settings=settings_for())
        stats = s3_bucket.server.stats()
        assert stats.object_gets_total == 1
        assert stats.gets_of(s3_bucket.name, "ns/dir1/file001.txt") == 1
        assert result.downloaded_files == 1
        assert (tmp_path / "two" / "dir1" / "file001.txt").read_bytes() == b"new content"

    def test_disabled_cache_downloads_every_time(self, s3_bucket, namespace, settings_for, tmp_path):
        for name in ("one", "two"):
            stage_namespace_files(namespace, tmp_path / name, settings=settings_for(cache_enabled=False))
        assert s3_bucket.server.stats().object_gets_total == 2 * len(FILES)
        assert not (tmp_path / "cache").exists()


class TestPlacement:
    def test_task_writing_copy_leaves_cache_intact(self, s3_bucket, namespace, settings_for, tmp_path):
        stage_namespace_files(namespace, tmp_path / "one", settings=settings_for())
        with open(tmp_path / "one" / "dir0" / "file000.txt", "ab") as handle:
            handle.write(b"changed by the task")
        s3_bucket.server.reset_counters()
        stage_namespace_files(namespace, tmp_path / "two", settings=settings_for())
        assert s3_bucket.server.stats().object_gets_total == 0
        assert staged(tmp_path / "two") == FILES

    def test_hardlink_write_is_detected_and_repaired(self, s3_bucket, namespace, settings_for, tmp_path):
        stage_namespace_files(namespace, tmp_path / "one", settings=settings_for(cache_placement="hardlink"))
        target = tmp_path / "one" / "dir0" / "file000.txt"
        assert target.stat().st_nlink == 2
        assert not os.access(target, os.W_OK) or os.geteuid() == 0  # read-only unless we are root
        with open(target, "ab") as handle:  # Root bypasses the read-only mode, as a task running as root would.
            handle.write(b"damage")
        s3_bucket.server.reset_counters()
        result = stage_namespace_files(namespace, tmp_path / "two", settings=settings_for(cache_placement="hardlink"))
        assert s3_bucket.server.stats().gets_of(s3_bucket.name, "ns/dir0/file000.txt") == 1
        assert result.downloaded_files == 1
        assert staged(tmp_path / "two") == FILES

    def test_damaged_entry_discarded(self, s3_bucket, namespace, settings_for, tmp_path):
        stage_namespace_files(namespace, tmp_path / "one", settings=settings_for())
        entry = cache_entries(tmp_path / "cache")[0]
        os.chmod(entry, 0o644)
        entry.write_bytes(b"truncated")
        s3_bucket.server.reset_counters()
        stage_namespace_files(namespace, tmp_path / "two", settings=settings_for())
        assert s3_bucket.server.stats().object_gets_total == 1
        assert staged(tmp_path / "two") == FILES


class TestEviction:
    def test_cache_kept_under_cap(self, s3_bucket, namespace, settings_for, tmp_path):
        cap = 10 * len(next(iter(FILES.values())))
        result = stage_namespace_files(namespace, tmp_path / "one", settings=settings_for(cache_max_size=cap))
        sizes = [path.stat().st_size for path in cache_entries(tmp_path / "cache")]
        assert sum(sizes) <= cap
        assert 0 < len(sizes) < len(FILES)
        assert result.files == len(FILES)
        assert staged(tmp_path / "one") == FILES

    def test_least_recently_used_evicted_first(self, s3_bucket, settings_for, tmp_path):
        body = b"x" * 1000
        s3_bucket.put_objects({f"f{index}": body for index in range(4)}, prefix="a/")
        s3_bucket.put_objects({f"f{index}": body for index in range(4)}, prefix="b/")
        options = s3_bucket.server.storage_options()
        settings = settings_for(cache_max_size=6000)
        stage_namespace_files(Namespace(s3_bucket.url("a"), storage_options=options), tmp_path / "a", settings=settings)
        time.sleep(0.05)  # Access times order eviction; keep the two stagings apart.
        stage_namespace_files(Namespace(s3_bucket.url("b"), storage_options=options), tmp_path / "b", settings=settings)
        s3_bucket.server.reset_counters()
        stage_namespace_files(Namespace(s3_bucket.url("b"), storage_options=options), tmp_path / "b2", settings=settings)
        assert s3_bucket.server.stats().object_gets_total == 0  # The newer namespace stayed cached.

    def test_locked_entry_not_evicted(self, s3_bucket, namespace, settings_for, tmp_path):
        stage_namespace_files(namespace, tmp_path / "one", settings=settings_for())
        cache = NamespaceCache(tmp_path / "cache", max_size=0)
        fs = open_filesystem(namespace, max_connections=4)
        keys = [cache_key(remote) for remote in list_namespace(fs, namespace, 0)]
        with cache.locked(keys[0]):
            cache.evict()
        remaining = cache_entries(tmp_path / "cache")
        assert [path.name for path in remaining] == [keys[0]]


def run_worker(spec):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.namespace_files.staging_worker", json.dumps(spec, default=str)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_spec(s3_bucket, tmp_path, destination):
    return {
        "url": s3_bucket.url("ns"),
        "storage_options": s3_bucket.server.storage_options(),
        "destination": str(destination),
        "settings": {
            "host_parallel_downloads": 8,
            "task_parallel_downloads": 4,
            "budget_dir": str(tmp_path / "budget"),
            "cache_dir": str(tmp_path / "cache"),
        },
    }


@pytest.mark.slow
class TestProcesses:
    def test_concurrent_processes_download_once(self, s3_bucket, namespace, tmp_path):
        s3_bucket.server.set_get_latency(0.03)
        workers = [run_worker(worker_spec(s3_bucket, tmp_path, tmp_path / f"task{index}")) for index in range(4)]
        results = []
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=300)
            assert worker.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        stats = s3_bucket.server.stats()
        assert stats.object_gets_total == len(FILES)
        assert set(stats.object_gets_by_key.values()) == {1}
        assert sum(result["downloaded_files"] for result in results) == len(FILES)
        assert sum(result["cached_files"] for result in results) == 3 * len(FILES)
        for index in range(4):
            assert staged(tmp_path / f"task{index}") == FILES

    def test_killed_download_leaves_cache_usable(self, s3_bucket, namespace, tmp_path):
        s3_bucket.server.pause_object_gets()
        worker = run_worker(worker_spec(s3_bucket, tmp_path, tmp_path / "killed"))
        try:
            s3_bucket.server.wait_for_object_gets_in_flight(4, timeout=60)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
            s3_bucket.server.resume_object_gets()
        s3_bucket.server.reset_counters()
        result = stage_namespace_files(
            namespace,
            tmp_path / "next",
            settings=load_settings(
                host_parallel_downloads=8,
                task_parallel_downloads=4,
                budget_dir=tmp_path / "budget",
                cache_dir=tmp_path / "cache",
            ),
        )
        assert result.files == len(FILES)
        assert staged(tmp_path / "next") == FILES
        assert list((tmp_path / "cache" / "tmp").iterdir()) == []
        assert not list((tmp_path / "killed").rglob("*.txt"))

    def test_stale_temporary_file_removed(self, s3_bucket, namespace, settings_for, tmp_path, caplog):
        cache = NamespaceCache(tmp_path / "cache", max_size=2**30)
        stale = cache.temporary_path("c" * 64)
        stale.write_bytes(b"half a download from a killed task")
        with caplog.at_level("INFO"):
            stage_namespace_files(namespace, tmp_path / "one", settings=settings_for())
        assert not stale.exists()
        assert "Removed 1 temporary files" in caplog.text

    def test_waiting_holds_no_budget_slot(self, s3_bucket, namespace, settings_for, tmp_path):
        settings = settings_for()
        fs = open_filesystem(namespace, max_connections=4)
        remotes = list_namespace(fs, namespace, 0)
        cache = NamespaceCache(settings.cache_dir, settings.cache_max_size)
        blocked = cache_key(remotes[0])
        budget = HostBudget(settings.budget_dir, settings.host_parallel_downloads)
        outcome = {}
        with cache.locked(blocked):  # Another task is downloading this file.
            worker = threading.Thread(
                target=lambda: outcome.update(result=stage_namespace_files(namespace, tmp_path / "one", settings=settings))
            )
            worker.start()
            deadline = time.monotonic() + 120
            while s3_bucket.server.stats().object_gets_total < len(FILES) - 1:
                assert time.monotonic() < deadline, "the other files were not staged"
                time.sleep(0.05)
            time.sleep(0.2)
            assert worker.is_alive()  # still waiting for the locked file
            assert budget.slots_in_use() == 0
        worker.join(timeout=120)
        assert outcome["result"].files == len(FILES)
        budget.close()


class TestHelpers:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [("1048576", 2**20), ("5GiB", 5 * 2**30), ("500 MB", 500 * 10**6), ("1.5k", 1500), ("0", 0)],
    )
    def test_parse_size(self, text, expected):
        assert parse_size(text) == expected

    @pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1GB", "GB"])
    def test_parse_size_rejects(self, text):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(text)

    def test_invalid_size_setting_names_option(self, settings_for):
        with pytest.raises(ValueError, match=r"\[namespace_files\] cache_max_size = 'huge'"):
            settings_for(cache_max_size="huge")

    def test_md5_mismatch_rejected(self, tmp_path):
        cache = NamespaceCache(tmp_path / "cache", max_size=2**20)
        temporary = cache.temporary_path("a" * 64)
        temporary.write_bytes(b"hello")
        assert expected_md5('checksum:5d41402abc4b2a76b9719d911017c592') == "5d41402abc4b2a76b9719d911017c592"
        with pytest.raises(IncompleteDownloadError, match="does not match its MD5"):
            cache.commit("a" * 64, temporary, expected_md5("checksum:" + "0" * 32))
        cache.commit("b" * 64, temporary, expected_md5("checksum:5d41402abc4b2a76b9719d911017c592"))
        assert cache.entry_path("b" * 64).read_bytes() == b"hello"

    def test_multipart_etag_is_not_an_md5(self):
        assert expected_md5("checksum:0123456789abcdef0123456789abcdef-3") is None
        assert expected_md5("version:abc") is None
