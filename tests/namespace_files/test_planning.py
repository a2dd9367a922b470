from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from kestra_perf_provider.exceptions import FileConflictError, NamespaceFilesConfigError, UnsafePathError
from kestra_perf_provider.namespace_files.planning import (
    IfExists,
    PathFilter,
    RemoteFile,
    build_plan,
    compile_pattern,
)
from kestra_perf_provider.namespace_files.sources import Namespace

SHARED = Namespace("s3://bucket/ns/shared")
TEAM = Namespace("s3://bucket/ns/team-a")


def listing(namespace: Namespace, index: int, *relatives: str, size: int = 3) -> list[RemoteFile]:
    root = namespace.root
    return [
        RemoteFile(namespace=namespace, namespace_index=index, path=f"{root}/{relative}", relative=relative, size=size)
        for relative in relatives
    ]


def plan_of(tmp_path: Path, *listings: list[RemoteFile], **kwargs):
    kwargs.setdefault("path_filter", PathFilter())
    return build_plan(listings, tmp_path, **kwargs)


class TestPathFilter:
    @pytest.mark.parametrize(
        ("include", "exclude", "path", "expected"),
        [
            pytest.param(None, None, "a.txt", True, id="default-includes-top-level"),
            pytest.param(None, None, "dir/sub/a.txt", True, id="default-includes-nested"),
            pytest.param(None, None, ".env", False, id="default-skips-dotfile"),
            pytest.param(None, None, ".git/config", False, id="default-skips-dot-folder"),
            pytest.param(None, None, "dir/.cache/x", False, id="default-skips-nested-dot-folder"),
            pytest.param(["*.sql"], None, "q/deep/report.sql", True, id="slashless-pattern-matches-any-depth"),
            pytest.param(["/*.sql"], None, "q/report.sql", False, id="leading-slash-anchors-to-root"),
            pytest.param(["/*.sql"], None, "report.sql", True, id="leading-slash-top-level"),
            pytest.param(["scripts/**"], None, "scripts/a/b.py", True, id="double-star-below-folder"),
            pytest.param(["scripts/**"], None, "scripts", False, id="double-star-needs-a-name"),
            pytest.param(["scripts/**"], None, "other/scripts/a.py", False, id="folder-pattern-is-anchored"),
            pytest.param(["data/"], None, "data/x/y.csv", True, id="trailing-slash-means-folder"),
            pytest.param(["**/*.csv"], None, "x.csv", True, id="double-star-matches-zero-folders"),
            pytest.param(["data/*.csv"], None, "data/x/y.csv", False, id="star-stays-in-one-segment"),
            pytest.param(["data/?.csv"], None, "data/a.csv", True, id="question-mark-one-char"),
            pytest.param(["data/[ab].csv"], None, "data/c.csv", False, id="character-class"),
            pytest.param(["data/[!ab].csv"], None, "data/c.csv", True, id="negated-character-class"),
            pytest.param([".env"], None, ".env", True, id="dot-pattern-matches-dotfile"),
            pytest.param(["**/.*"], None, "a/.hidden", True, id="dot-star-matches-nested-dotfile"),
            pytest.param([".github/**"], None, ".github/workflows/ci.yml", True, id="dot-folder-named"),
            pytest.param(None, ["*.tmp"], "a/b.tmp", False, id="exclude-wins"),
            pytest.param(None, ["docs/"], "docs/readme.md", False, id="exclude-folder"),
            pytest.param(None, ["docs/"], "src/docs.md", True, id="exclude-folder-not-prefix"),
            pytest.param(["*.py"], ["tests/**"], "tests/test_a.py", False, id="exclude-after-include"),
            pytest.param(["données/*"], None, "données/été 2026.csv", True, id="unicode-and-spaces"),
        ],
    )
    def test_matches(self, include, exclude, path, expected):
        assert PathFilter(include, exclude).matches(path) is expected

    @pytest.mark.parametrize("pattern", ["", "   ", None, 3])
    def test_invalid_pattern_rejected(self, pattern):
        with pytest.raises(NamespaceFilesConfigError, match="Invalid glob pattern"):
            compile_pattern(pattern)

    def test_string_means_one_pattern(self):
        assert PathFilter("*.sql").include == ("*.sql",)


class TestOverrideOrder:
    def test_later_namespace_wins(self, tmp_path):
        plan = plan_of(
            tmp_path,
            listing(SHARED, 0, "config.json", "a.txt"),
            listing(TEAM, 1, "config.json"),
        )
        winners = {planned.destination.name: planned.source.namespace for planned in plan.downloads}
        assert winners["config.json"] is TEAM
        assert winners["a.txt"] is SHARED
        assert plan.overridden == 1
        assert len(plan.downloads) == 2

    def test_order_of_keys_in_listing_is_irrelevant(self, tmp_path):
        first = plan_of(tmp_path, listing(SHARED, 0, "b", "a"), listing(TEAM, 1, "a", "b"))
        second = plan_of(tmp_path, listing(SHARED, 0, "a", "b"), listing(TEAM, 1, "b", "a"))
        for plan in (first, second):
            assert {planned.source.namespace for planned in plan.downloads} == {TEAM}

    def test_folder_per_namespace_keeps_both(self, tmp_path):
        plan = plan_of(
            tmp_path,
            listing(SHARED, 0, "config.json"),
            listing(TEAM, 1, "config.json"),
            folder_per_namespace=True,
        )
        destinations = sorted(str(planned.destination.relative_to(tmp_path)) for planned in plan.downloads)
        assert destinations == ["shared/config.json", "team-a/config.json"]
        assert plan.overridden == 0

    def test_excluded_files_counted(self, tmp_path):
        plan = plan_of(tmp_path, listing(SHARED, 0, "a.py", "b.tmp", ".env"), path_filter=PathFilter(None, "*.tmp"))
        assert [planned.destination.name for planned in plan.downloads] == ["a.py"]
        assert plan.excluded == 2


class TestIfExists:
    @pytest.fixture
    def existing(self, tmp_path):
        (tmp_path / "a.txt").write_text("mine")
        return tmp_path

    def test_overwrite_downloads(self, existing):
        plan = plan_of(existing, listing(SHARED, 0, "a.txt", "b.txt"), if_exists="overwrite")
        assert sorted(planned.destination.name for planned in plan.downloads) == ["a.txt", "b.txt"]

    def test_skip_keeps_file(self, existing):
        plan = plan_of(existing, listing(SHARED, 0, "a.txt", "b.txt"), if_exists=IfExists.SKIP)
        assert [planned.destination.name for planned in plan.downloads] == ["b.txt"]
        assert plan.kept_existing == [existing / "a.txt"]

    def test_warn_keeps_file_and_logs(self, existing, caplog):
        with caplog.at_level(logging.WARNING):
            plan = plan_of(existing, listing(SHARED, 0, "a.txt"), if_exists="WARN")
        assert plan.downloads == []
        assert "Keeping existing file" in caplog.text
        assert str(existing / "a.txt") in caplog.text

    def test_fail_names_every_file(self, existing):
        (existing / "b.txt").write_text("mine too")
        with pytest.raises(FileConflictError, match=r"2 namespace file\(s\) already exist.*a\.txt.*b\.txt"):
            plan_of(existing, listing(SHARED, 0, "a.txt", "b.txt", "c.txt"), if_exists="fail")

    def test_unknown_mode_rejected(self, tmp_path):
        with pytest.raises(NamespaceFilesConfigError, match="Invalid if_exists 'replace'.*overwrite, skip, warn, fail"):
            plan_of(tmp_path, listing(SHARED, 0, "a"), if_exists="replace")

    def test_existing_folder_conflicts(self, tmp_path):
        (tmp_path / "a.txt").mkdir()
        with pytest.raises(FileConflictError, match="is an existing folder"):
            plan_of(tmp_path, listing(SHARED, 0, "a.txt"))


class TestUnsafeKeys:
    @pytest.mark.parametrize(
        "relative",
        ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a//b", "a/./b", "a/.."],
    )
    def test_rejected(self, tmp_path, relative):
        with pytest.raises(UnsafePathError, match="Unsafe object key"):
            plan_of(tmp_path, listing(SHARED, 0, relative))
        assert list(tmp_path.iterdir()) == []

    def test_rejected_even_when_excluded_by_default_include(self, tmp_path):
        # '**' does not match '..'; the key must still be reported, not silently dropped.
        with pytest.raises(UnsafePathError, match=r"\.\./x"):
            plan_of(tmp_path, listing(SHARED, 0, "ok.txt", "../x"))

    def test_symlinked_folder_escaping_rejected(self, tmp_path):
        outside = tmp_path / "outside"
        outside.mkdir()
        work = tmp_path / "work"
        work.mkdir()
        os.symlink(outside, work / "data")
        with pytest.raises(UnsafePathError, match="resolves outside the working directory"):
            plan_of(work, listing(SHARED, 0, "data/x.csv"))


class TestFileFolderClash:
    def test_key_that_is_file_and_folder(self, tmp_path):
        with pytest.raises(FileConflictError, match="'a' .* is a file, but 'a/b'"):
            plan_of(tmp_path, listing(SHARED, 0, "a", "a/b"))

    def test_clash_across_namespaces(self, tmp_path):
        with pytest.raises(FileConflictError, match="needs it to be a folder"):
            plan_of(tmp_path, listing(SHARED, 0, "cfg"), listing(TEAM, 1, "cfg/x"))
