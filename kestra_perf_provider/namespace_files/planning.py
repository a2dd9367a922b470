"""
Planning: which listed object becomes which file in the working directory.

The whole plan is decided from the listings before the first download starts, so the file that wins
a path shared by two namespaces (the later namespace) never depends on which download ends first.

Include and exclude patterns are matched against each object's path relative to its namespace root,
written with ``/``:

- ``*`` matches any characters inside one path segment, ``?`` one character, ``[abc]`` a set;
- ``**`` as a whole segment matches zero or more folders (``scripts/**`` is everything under
  ``scripts``, ``**/*.sql`` is every ``.sql`` file at any depth);
- a pattern without ``/`` matches the file name at any depth: ``*.sql`` equals ``**/*.sql``;
- a leading ``/`` anchors a pattern to the root: ``/*.sql`` matches top-level files only;
- a trailing ``/`` means everything under that folder: ``data/`` equals ``data/**``;
- a segment that starts with ``.`` (a dotfile or dot-folder) is matched only by a pattern segment
  that itself starts with ``.``: ``**`` and ``*`` skip ``.git/config`` and ``.env``, while ``.env``,
  ``**/.*`` or ``.github/**`` match them.

A file is staged when it matches at least one include pattern (default: ``**``, every file outside
dot-folders) and no exclude pattern.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kestra_perf_provider.exceptions import (
    FileConflictError,
    NamespaceFilesConfigError,
    UnsafePathError,
)

if TYPE_CHECKING:
    from kestra_perf_provider.namespace_files.sources import Namespace

log = logging.getLogger(__name__)

# Files named one by one in if_exists=warn warnings; the rest are counted in one line.
_WARNINGS_SHOWN = 10


class IfExists(str, enum.Enum):
    """Action of a staging on a file that is already in the working directory."""

    OVERWRITE = "overwrite"  # replace it with the namespace's file
    SKIP = "skip"  # keep it, silently
    WARN = "warn"  # keep it, and log a warning naming it
    FAIL = "fail"  # fail the staging before any download

    @classmethod
    def parse(cls, value: str | IfExists) -> IfExists:
        try:
            return cls(str(value.value if isinstance(value, IfExists) else value).lower())
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise NamespaceFilesConfigError(
                f"Invalid if_exists {value!r}: expected one of {choices}."
            ) from None


@dataclass(frozen=True)
class RemoteFile:
    """One object listed under a namespace root."""

    namespace: Namespace
    namespace_index: int
    path: str  # as the filesystem names it, for the download
    relative: str  # below the namespace root, '/'-separated
    size: int | None
    identity: str | None = None  # version id, ETag/checksum, or size plus mtime


@dataclass(frozen=True)
class PlannedFile:
    """A download of one remote file to its final path."""

    source: RemoteFile
    destination: Path


@dataclass
class StagingPlan:
    """The downloads of one staging and the decisions taken without downloading."""

    downloads: list[PlannedFile] = field(default_factory=list)
    kept_existing: list[Path] = field(default_factory=list)
    overridden: int = 0
    excluded: int = 0


def _segment_regex(segment: str) -> str:
    """Translate one glob segment (no ``/``) to a regex; a leading dot must be literal."""
    out = [] if segment.startswith(".") else [r"(?!\.)"]
    index = 0
    while index < len(segment):
        char = segment[index]
        if char == "*":
            out.append(r"[^/]*")
        elif char == "?":
            out.append(r"[^/]")
        elif char == "[":
            end = segment.find("]", index + 2 if segment[index + 1 : index + 2] in ("!", "]") else index + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = segment[index + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                index = end
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """
    Compile one include or exclude pattern (semantics in the module docstring).

    :raises NamespaceFilesConfigError: the pattern is empty or not a string.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise NamespaceFilesConfigError(
            f"Invalid glob pattern {pattern!r}: expected a non-empty string such as '**/*.sql'."
        )
    text = pattern.strip()
    if text.endswith("/"):
        text += "**"
    if text.startswith("/"):
        text = text.lstrip("/")
    elif "/" not in text:
        text = "**/" + text
    segments = [segment for segment in text.split("/") if segment]
    parts = []
    for position, segment in enumerate(segments):
        last = position == len(segments) - 1
        if segment == "**":
            # Zero or more non-dot folders; as the last segment, one or more non-dot names.
            parts.append(r"(?:[^/.][^/]*)(?:/[^/.][^/]*)*" if last else r"(?:[^/.][^/]*/)*")
        else:
            parts.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(parts) + r"\Z")


class PathFilter:
    """Include and exclude glob patterns over namespace-relative paths."""

    def __init__(self, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None):
        self.include = _as_patterns(include, default=("**",))
        self.exclude = _as_patterns(exclude, default=())
        self._include = [compile_pattern(pattern) for pattern in self.include]
        self._exclude = [compile_pattern(pattern) for pattern in self.exclude]

    def matches(self, relative: str) -> bool:
        if not any(regex.match(relative) for regex in self._include):
            return False
        return not any(regex.match(relative) for regex in self._exclude)


def _as_patterns(value: Sequence[str] | str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def check_relative_path(relative: str, namespace_url: str) -> str:
    """
    Return a namespace-relative key unchanged, rejecting any key that could leave the working directory.

    :raises UnsafePathError: the key is absolute, or contains ``..``, ``.`` or empty segments.
    """
    if (
        relative.startswith("/")
        or "\0" in relative
        or any(segment in ("", ".", "..") for segment in relative.split("/"))
    ):
        raise UnsafePathError(
            f"Unsafe object key {relative!r} in namespace {namespace_url!r}: it would be written outside "
            "the task's working directory (absolute path, '..', '.' or an empty segment). Rename or "
            "delete the object, or stage a narrower prefix that does not contain it."
        )
    return relative


def build_plan(
    listings: Iterable[Sequence[RemoteFile]],
    working_dir: Path,
    *,
    path_filter: PathFilter,
    if_exists: IfExists | str = IfExists.OVERWRITE,
    folder_per_namespace: bool = False,
) -> StagingPlan:
    """
    Decide every download of a staging from the namespaces' listings, in namespace order.

    :param listings: one listing per namespace, in the order given by the user; later namespaces win
        a shared destination path.
    :param working_dir: the folder the files are staged into.
    :raises UnsafePathError: a listed key would escape ``working_dir``.
    :raises FileConflictError: ``if_exists='fail'`` and a destination exists, a destination is an
        existing folder, or one key is both a file and a folder of another key.
    """
    if_exists = IfExists.parse(if_exists)
    plan = StagingPlan()
    winners: dict[str, RemoteFile] = {}
    for listing in listings:
        for remote in listing:
            # Checked before filtering: '**' never matches '..', so an unsafe key would otherwise
            # be dropped silently instead of reported.
            relative = check_relative_path(remote.relative, remote.namespace.url)
            if not path_filter.matches(relative):
                plan.excluded += 1
                continue
            if folder_per_namespace:
                folder = check_relative_path(remote.namespace.folder_name, remote.namespace.url)
                relative = f"{folder}/{relative}"
            if relative in winners:
                plan.overridden += 1
            winners[relative] = remote

    _reject_file_folder_clashes(winners)
    # A fresh working directory (the usual case) contains no file to collide with and no symlink to
    # escape through, so the per-file filesystem checks are skipped.
    empty = not any(os.scandir(working_dir)) if os.path.isdir(working_dir) else True
    checker = None if empty else _DestinationChecker(working_dir)
    conflicts = []
    for relative, remote in winners.items():
        destination = working_dir / relative
        if checker is not None and not checker.may_write(destination, remote, if_exists, conflicts, plan):
            continue
        plan.downloads.append(PlannedFile(source=remote, destination=destination))
    if if_exists is IfExists.WARN and len(plan.kept_existing) > _WARNINGS_SHOWN:
        log.warning(
            "Kept %d existing files in total instead of staging them (if_exists=warn); the first %d are listed above",
            len(plan.kept_existing),
            _WARNINGS_SHOWN,
        )
    if conflicts:
        shown = ", ".join(str(path) for path in conflicts[:10])
        more = f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        raise FileConflictError(
            f"{len(conflicts)} namespace file(s) already exist in the working directory: {shown}{more}. "
            "Remove them, or set if_exists (namespace_if_exists on an operator) to overwrite, skip or warn."
        )
    return plan


class _DestinationChecker:
    """Checks of destinations inside a working directory that already has content."""

    def __init__(self, working_dir: Path) -> None:
        self.root = os.path.realpath(working_dir)
        self._inside: dict[Path, bool] = {}

    def may_write(
        self,
        destination: Path,
        remote: RemoteFile,
        if_exists: IfExists,
        conflicts: list[Path],
        plan: StagingPlan,
    ) -> bool:
        """Tell whether to download to ``destination``; record kept files and conflicts."""
        self._ensure_inside(destination, remote)
        if os.path.isdir(destination) and not os.path.islink(destination):
            raise FileConflictError(
                f"Cannot stage {remote.relative!r} from namespace {remote.namespace.url!r}: "
                f"{destination} is an existing folder. Remove it or exclude the file."
            )
        if if_exists is IfExists.OVERWRITE or not os.path.lexists(destination):
            return True
        if if_exists is IfExists.FAIL:
            conflicts.append(destination)
            return False
        if if_exists is IfExists.WARN and len(plan.kept_existing) < _WARNINGS_SHOWN:
            log.warning(
                "Keeping existing file %s instead of staging %s from namespace %s (if_exists=warn)",
                destination,
                remote.relative,
                remote.namespace.url,
            )
        plan.kept_existing.append(destination)
        return False

    def _ensure_inside(self, destination: Path, remote: RemoteFile) -> None:
        # Keys are already free of '..'; this catches a symlinked folder inside the working
        # directory that points elsewhere. Checked once per folder.
        parent = destination.parent
        inside = self._inside.get(parent)
        if inside is None:
            inside = os.path.commonpath([self.root, os.path.realpath(parent)]) == self.root
            self._inside[parent] = inside
        if not inside:
            raise UnsafePathError(
                f"Unsafe destination for {remote.relative!r} from namespace {remote.namespace.url!r}: "
                f"{destination} resolves outside the working directory {self.root}. Remove the "
                "symlink, or exclude the file."
            )


def _reject_file_folder_clashes(winners: dict[str, RemoteFile]) -> None:
    for relative, remote in winners.items():
        slash = relative.rfind("/")
        while slash > 0:
            other = winners.get(relative[:slash])
            if other is not None:
                raise FileConflictError(
                    f"Conflicting keys: {other.relative!r} (namespace {other.namespace.url!r}) is a file, "
                    f"but {remote.relative!r} (namespace {remote.namespace.url!r}) needs it to be a folder. "
                    "Exclude one of them."
                )
            slash = relative.rfind("/", 0, slash)
