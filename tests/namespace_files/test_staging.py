"""Staging from local and instrumented local filesystems: the thread-pool path of the engine."""

from __future__ import annotations

import os
import threading
import time

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from kestra_perf_provider.exceptions import FileConflictError, StagingError
from kestra_perf_provider.namespace_files import Namespace, stage_namespace_files
from kestra_perf_provider.namespace_files.settings import load_settings
from kestra_perf_provider.namespace_files.transfer import TEMP_SUFFIX


class InstrumentedLocalFileSystem(LocalFileSystem):
    """Local filesystem that holds each copy for a moment, records concurrency and injects errors."""

    protocol = "instrumentedlocal"
    hold_seconds = 0.02
    lock = threading.Lock()
    in_flight = 0
    max_in_flight = 0
    gets = 0
    failures: dict[str, list[BaseException]] = {}

    @classmethod
    def reset(cls):
        cls.in_flight = cls.max_in_flight = cls.gets = 0
        cls.failures = {}

    def get_file(self, rpath, lpath, **kwargs):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.gets += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            pending = cls.failures.get(os.path.basename(rpath))
            error = pending.pop(0) if pending else None
        try:
            time.sleep(self.hold_seconds)
            if error is not None:
                with open(lpath, "wb") as partial:
                    partial.write(b"partial")  # A failure after some bytes, as a network copy would have.
                raise error
            return super().get_file(rpath, lpath, **kwargs)
        finally:
            with cls.lock:
                cls.in_flight -= 1


fsspec.register_implementation("instrumentedlocal", InstrumentedLocalFileSystem, clobber=True)


@pytest.fixture
def instrumented():
    InstrumentedLocalFileSystem.reset()
    yield InstrumentedLocalFileSystem
    InstrumentedLocalFileSystem.reset()


@pytest.fixture
def settings(tmp_path):
    return load_settings(
        host_parallel_downloads=8,
        task_parallel_downloads=4,
        budget_dir=tmp_path / "budget",
        max_retries=2,
        cache_dir=tmp_path / "cache",
    )


def make_tree(root, count, size=10):
    for index in range(count):
        path = root / f"d{index % 5}" / f"f{index:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([65 + index % 26]) * size)


def leftovers(directory):
    return [path for path in directory.rglob("*") if path.name.endswith(TEMP_SUFFIX)]


class TestLocalStaging:
    def test_tree_is_copied(self, tmp_path, settings):
        source = tmp_path / "ns"
        make_tree(source, 30)
        (source / "empty.bin").write_bytes(b"")
        (source / "sp ace é.txt").write_text("ü")
        result = stage_namespace_files(f"file://{source}", tmp_path / "work", settings=settings)
        copied = {str(path.relative_to(tmp_path / "work")) for path in (tmp_path / "work").rglob("*") if path.is_file()}
        expected = {str(path.relative_to(source)) for path in source.rglob("*") if path.is_file()}
        assert copied == expected
        assert result.files == 32
        assert result.bytes == 30 * 10 + len("ü".encode())
        assert (tmp_path / "work" / "empty.bin").read_bytes() == b""

    def test_large_file(self, tmp_path, settings):
        source = tmp_path / "ns"
        source.mkdir()
        payload = os.urandom(1024 * 1024) * 24
        (source / "big.bin").write_bytes(payload)
        stage_namespace_files(f"file://{source}", tmp_path / "work", settings=settings)
        assert (tmp_path / "work" / "big.bin").read_bytes() == payload

    def test_empty_namespace_stages_nothing(self, tmp_path, settings):
        (tmp_path / "ns").mkdir()
        result = stage_namespace_files(f"file://{tmp_path / 'ns'}", tmp_path / "work", settings=settings)
        assert result.files == 0
        assert list((tmp_path / "work").iterdir()) == []


class TestThreadedConcurrency:
    def test_cap_bounds_in_flight(self, tmp_path, settings, instrumented):
        make_tree(tmp_path / "ns", 40)
        result = stage_namespace_files(f"instrumentedlocal://{tmp_path / 'ns'}", tmp_path / "work", settings=settings)
        assert result.files == 40
        assert instrumented.max_in_flight <= settings.task_parallel_downloads
        assert instrumented.max_in_flight == settings.task_parallel_downloads  # The window was kept full.
        assert result.peak_in_flight == instrumented.max_in_flight


class TestFailures:
    def test_transient_error_retried(self, tmp_path, settings, instrumented):
        make_tree(tmp_path / "ns", 10)
        instrumented.failures["f0003.txt"] = [ConnectionResetError("reset by peer")]
        result = stage_namespace_files(f"instrumentedlocal://{tmp_path / 'ns'}", tmp_path / "work", settings=settings)
        assert result.files == 10
        assert result.retries == 1
        assert (tmp_path / "work" / "d3" / "f0003.txt").read_bytes() == b"D" * 10
        assert leftovers(tmp_path / "work") == []

    def test_retries_exhausted_fails(self, tmp_path, settings, instrumented):
        make_tree(tmp_path / "ns", 5)
        instrumented.failures["f0001.txt"] = [TimeoutError("slow")] * 3
        with pytest.raises(StagingError, match=r"'d1/f0001.txt' from namespace .* after 3 tries \(transient error\)"):
            stage_namespace_files(f"instrumentedlocal://{tmp_path / 'ns'}", tmp_path / "work", settings=settings)
        assert not (tmp_path / "work" / "d1" / "f0001.txt").exists()
        assert leftovers(tmp_path / "work") == []

    def test_permanent_error_fails_at_once_and_cancels(self, tmp_path, settings, instrumented):
        make_tree(tmp_path / "ns", 200)
        instrumented.failures["f0000.txt"] = [PermissionError("access denied")]
        with pytest.raises(StagingError, match=r"'d0/f0000.txt'.*after 1 try \(permanent error\).*access denied"):
            stage_namespace_files(f"instrumentedlocal://{tmp_path / 'ns'}", tmp_path / "work", settings=settings)
        assert not (tmp_path / "work" / "d0" / "f0000.txt").exists()
        assert leftovers(tmp_path / "work") == []
        assert instrumented.gets < 200  # The remaining transfers were cancelled.

    def test_missing_namespace_names_url(self, tmp_path, settings):
        with pytest.raises(FileNotFoundError, match="Namespace 'file://.*/nope' not found"):
            stage_namespace_files(Namespace(f"file://{tmp_path / 'nope'}"), tmp_path / "work", settings=settings)


class TestWorkingDirectory:
    def test_failed_staging_creates_no_folder(self, tmp_path, settings):
        destination = tmp_path / "new" / "work"
        with pytest.raises(FileNotFoundError):
            stage_namespace_files(f"file://{tmp_path / 'missing'}", destination, settings=settings)
        assert not (tmp_path / "new").exists()

    def test_file_where_folder_belongs(self, tmp_path, settings):
        source = tmp_path / "ns"
        (source / "scripts").mkdir(parents=True)
        (source / "scripts" / "run.py").write_text("print()")
        work = tmp_path / "work"
        work.mkdir()
        (work / "scripts").write_text("a file, not a folder")
        with pytest.raises(FileConflictError, match="scripts is an existing file"):
            stage_namespace_files(f"file://{source}", work, settings=settings)

    def test_directory_in_cache_discarded(self, tmp_path, settings):
        source = tmp_path / "ns"
        source.mkdir()
        (source / "a.txt").write_text("alpha")
        stage_namespace_files(f"file://{source}", tmp_path / "one", settings=settings)
        [entry] = [path for path in (tmp_path / "cache" / "objects").rglob("*") if path.is_file()]
        os.chmod(entry, 0o644)
        entry.unlink()
        entry.mkdir()  # What a bug or a hand edit could leave under an entry's name.
        result = stage_namespace_files(f"file://{source}", tmp_path / "two", settings=settings)
        assert result.downloaded_files == 1
        assert (tmp_path / "two" / "a.txt").read_text() == "alpha"
