"""
Namespaces: where namespace files come from, and the fsspec filesystem that reads them.

A namespace is a prefix in object storage named by an fsspec URL (``s3://bucket/ns/team-a``,
``gs://...``, ``file:///srv/ns``, ``memory://ns``), optionally with an Airflow connection id that
supplies credentials and endpoint.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kestra_perf_provider.exceptions import (
    InvalidNamespaceError,
    NamespaceFilesConfigError,
    NamespaceNotFoundError,
    UnknownConnectionError,
)
from kestra_perf_provider.namespace_files.planning import RemoteFile

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

# Schemes whose fsspec implementation lives in a separate package, with the extra that installs it.
_INSTALL_HINTS = {
    "s3": "pip install 'airflow-provider-kestra-perf[s3]'",
    "s3a": "pip install 'airflow-provider-kestra-perf[s3]'",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "abfs": "pip install adlfs",
    "az": "pip install adlfs",
    "sftp": "pip install paramiko",
}

_S3_SCHEMES = frozenset({"s3", "s3a", "s3n"})


@dataclass(frozen=True)
class Namespace:
    """
    A namespace root to stage files from.

    :param url: fsspec URL of the root (``s3://bucket/prefix``, ``file:///abs/path``, ``memory://x``);
        a bare absolute path means the local filesystem.
    :param conn_id: Airflow connection whose credentials and endpoint reach the storage; its
        filesystem comes from ``airflow.sdk.io.get_fs`` and ``storage_options`` are handed to it.
    :param storage_options: keyword arguments of the fsspec filesystem when there is no ``conn_id``.
    :param folder: subfolder used when the operator stages each namespace into its own folder;
        defaults to the last segment of the URL path.
    """

    url: str
    conn_id: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    folder: str | None = None

    @property
    def protocol(self) -> str:
        return _split_url(self.url)[0]

    @property
    def root(self) -> str:
        """The root path as the filesystem names it (no scheme, no trailing slash)."""
        return _split_url(self.url)[1]

    @property
    def folder_name(self) -> str:
        if self.folder:
            return self.folder
        return self.root.rstrip("/").rsplit("/", 1)[-1] or self.protocol


def _split_url(url: str) -> tuple[str, str]:
    if not isinstance(url, str) or not url.strip():
        raise InvalidNamespaceError(
            f"Invalid namespace URL {url!r}: expected an fsspec URL such as 's3://bucket/prefix' "
            "or 'file:///absolute/path'."
        )
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # One letter is a Windows drive, not a scheme.
        if not os.path.isabs(url):
            raise InvalidNamespaceError(
                f"Invalid namespace URL {url!r}: a local namespace needs an absolute path; "
                f"write 'file://{os.path.abspath(url)}' or another fsspec URL."
            )
        return "file", url.rstrip("/") or "/"
    scheme = parts.scheme.lower()
    if scheme in ("file", "local"):
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidNamespaceError(
                f"Invalid namespace URL {url!r}: a file URL needs an absolute path and no host; "
                "write 'file:///absolute/path'."
            )
        return "file", (parts.path.rstrip("/") or "/")
    root = f"{parts.netloc}{parts.path}".rstrip("/")
    if not root:
        raise InvalidNamespaceError(
            f"Invalid namespace URL {url!r}: it names no bucket or path; write e.g. '{scheme}://bucket/prefix'."
        )
    return scheme, root


def coerce_namespaces(value: Any) -> list[Namespace]:
    """
    Turn an operator's ``namespaces`` argument into a list of :class:`Namespace`.

    Accepts one item or a list of items, each a URL string, a :class:`Namespace`, or a mapping with
    the keys of :class:`Namespace` (the form that survives Jinja templating and XCom).
    """
    if value is None:
        raise NamespaceFilesConfigError(
            "Missing namespaces: set namespaces= to one or more URLs such as 's3://bucket/ns/team-a'."
        )
    items: Iterable[Any] = [value] if isinstance(value, (str, Namespace, Mapping)) else value
    namespaces = []
    for item in items:
        if isinstance(item, Namespace):
            namespace = item
        elif isinstance(item, str):
            namespace = Namespace(item)
        elif isinstance(item, Mapping):
            unknown = set(item) - {"url", "conn_id", "storage_options", "folder"}
            if unknown or "url" not in item:
                raise NamespaceFilesConfigError(
                    f"Invalid namespace {dict(item)!r}: expected the keys url (required), conn_id, "
                    f"storage_options and folder; unknown keys: {sorted(unknown) or 'none'}."
                )
            namespace = Namespace(
                url=item["url"],
                conn_id=item.get("conn_id"),
                storage_options=dict(item.get("storage_options") or {}),
                folder=item.get("folder"),
            )
        else:
            raise NamespaceFilesConfigError(
                f"Invalid namespace {item!r} of type {type(item).__name__}: expected a URL string, "
                "a Namespace or a mapping with a 'url' key."
            )
        _check_protocol(namespace)  # Reject a bad URL at parse time, before any task runs.
        namespaces.append(namespace)
    if not namespaces:
        raise NamespaceFilesConfigError(
            "Missing namespaces: the list is empty; give one or more URLs such as 's3://bucket/ns/team-a'."
        )
    return namespaces


def check_folders(namespaces: Iterable[Namespace]) -> None:
    """
    Reject namespaces that would share a subfolder when each is staged into its own.

    :raises NamespaceFilesConfigError: two namespaces have the same folder name.
    """
    seen: dict[str, Namespace] = {}
    for namespace in namespaces:
        other = seen.setdefault(namespace.folder_name, namespace)
        if other is not namespace:
            raise NamespaceFilesConfigError(
                f"Namespaces {other.url!r} and {namespace.url!r} would both be staged into folder "
                f"{namespace.folder_name!r} with folder_per_namespace; give one of them a distinct "
                "folder, e.g. {'url': ..., 'folder': 'shared-2'}."
            )


def _check_protocol(namespace: Namespace) -> None:
    from fsspec.registry import known_implementations, registry

    protocol = namespace.protocol
    if protocol not in known_implementations and protocol not in registry:
        raise InvalidNamespaceError(
            f"Invalid namespace URL {namespace.url!r}: no fsspec filesystem handles protocol {protocol!r}. "
            "Check the scheme, or install the package that provides it."
        )


def open_filesystem(namespace: Namespace, *, max_connections: int) -> AbstractFileSystem:
    """
    Return the fsspec filesystem of a namespace, with an HTTP connection pool of ``max_connections``.

    s3fs keeps at most ``max_pool_connections`` requests in flight (10 by default) whatever the
    caller's concurrency, so the pool is sized to the task's cap of parallel downloads.

    :raises UnknownConnectionError: ``conn_id`` is not defined in Airflow.
    :raises InvalidNamespaceError: no fsspec implementation handles the URL's protocol.
    """
    protocol = namespace.protocol
    if namespace.conn_id:
        return _open_with_connection(namespace, protocol, max_connections)

    import fsspec

    options = dict(namespace.storage_options)
    if protocol in _S3_SCHEMES:
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", max_connections)
        config.setdefault("signature_version", "s3v4")  # see s3_presigned.supports()
        options["config_kwargs"] = config
    try:
        return fsspec.filesystem(protocol, **options)
    except ValueError as err:  # fsspec raises ValueError for an unknown protocol.
        raise InvalidNamespaceError(
            f"Invalid namespace URL {namespace.url!r}: no fsspec filesystem handles protocol {protocol!r}. "
            "Check the scheme, or install the package that provides it."
        ) from err
    except ImportError as err:
        hint = _INSTALL_HINTS.get(protocol, "install the fsspec implementation of this protocol")
        raise InvalidNamespaceError(
            f"Namespace {namespace.url!r} needs the filesystem package of protocol {protocol!r}, "
            f"which is not installed: {hint}."
        ) from err


def _open_with_connection(namespace: Namespace, protocol: str, max_connections: int) -> AbstractFileSystem:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException
    from airflow.sdk.io import get_fs

    try:
        BaseHook.get_connection(namespace.conn_id)
    except AirflowNotFoundException as err:
        # Hooks such as the AWS one fall back to ambient credentials for a missing connection,
        # which would read from the wrong account, so an unknown id fails here instead.
        raise UnknownConnectionError(
            f"Unknown Airflow connection {namespace.conn_id!r} for namespace {namespace.url!r}: "
            "define it (airflow connections add, an AIRFLOW_CONN_* variable or a secrets backend) "
            "or fix the conn_id."
        ) from err

    options = dict(namespace.storage_options)
    if protocol in _S3_SCHEMES:
        # The Amazon provider's get_fs merges storage options into botocore's Config.
        options.setdefault("max_pool_connections", max_connections)
        options.setdefault("signature_version", "s3v4")  # see s3_presigned.supports()
    try:
        return get_fs(protocol, namespace.conn_id, options)
    except ValueError as err:
        raise InvalidNamespaceError(
            f"Invalid namespace {namespace.url!r} with conn_id {namespace.conn_id!r}: no Airflow "
            f"filesystem is registered for protocol {protocol!r}. Install the provider that registers "
            "it, or drop conn_id to use plain fsspec."
        ) from err


# Listing fields that identify one version of an object, strongest first: a version id changes with
# every write, an ETag or checksum with every content change.
_VERSION_FIELDS = ("VersionId", "version_id", "generation")
_CHECKSUM_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "checksum", "content_md5")
_MTIME_FIELDS = ("LastModified", "mtime", "last_modified", "updated", "created")


def file_identity(info: Mapping[str, Any]) -> str | None:
    """Return the strongest identity of a listed object that its filesystem reports, or None."""
    for kind, fields in (("version", _VERSION_FIELDS), ("checksum", _CHECKSUM_FIELDS)):
        for name in fields:
            value = info.get(name)
            if value not in (None, ""):
                return f"{kind}:{str(value).strip(chr(34))}"
    for name in _MTIME_FIELDS:
        value = info.get(name)
        if value not in (None, ""):
            return f"size-mtime:{info.get('size')}:{value}"
    return None


def list_namespace(fs: AbstractFileSystem, namespace: Namespace, index: int) -> list[RemoteFile]:
    """
    List every file under a namespace root with one recursive listing.

    Folder markers (zero-byte keys ending in ``/`` that some tools create for folders in object
    stores) are not files and are left out.

    :raises NamespaceNotFoundError: the root does not exist.
    :raises InvalidNamespaceError: the root is a file, not a folder.
    """
    root = fs._strip_protocol(namespace.url).rstrip("/")
    try:
        entries = fs.find(root, detail=True, withdirs=False)
        missing = not entries and not fs.exists(root)
    except FileNotFoundError as err:  # s3fs raises it for a missing bucket.
        raise _not_found(namespace, root, err) from err
    if missing:
        raise _not_found(namespace, root, None)
    prefix = root + "/" if root != "/" else "/"
    real_root = os.path.realpath(root) if namespace.protocol == "file" else None
    files = []
    for path, info in entries.items():
        if info.get("type") == "directory":
            continue
        if path == root:
            raise InvalidNamespaceError(
                f"Invalid namespace {namespace.url!r}: it names a file, not a folder of files. "
                "Use the URL of its parent folder and an include pattern."
            )
        if path.endswith("/"):
            continue  # A folder marker, including one for the namespace root itself.
        relative = path[len(prefix) :] if path.startswith(prefix) else path
        if real_root is not None and info.get("islink"):
            # fsspec lists every symlink as "other"; one to a file inside the namespace is staged
            # as that file.
            info = _resolve_local_link(path, real_root, relative, namespace)
        if info.get("type") != "file":
            log.warning("Skipping %r in namespace %s: not a regular file", relative, namespace.url)
            continue
        files.append(
            RemoteFile(
                namespace=namespace,
                namespace_index=index,
                path=path,
                relative=relative,
                size=info.get("size"),
                identity=file_identity(info),
            )
        )
    return files


def _not_found(namespace: Namespace, root: str, cause: BaseException | None) -> NamespaceNotFoundError:
    connection = f" (connection {namespace.conn_id!r})" if namespace.conn_id else ""
    detail = f": {cause}" if cause else ""
    return NamespaceNotFoundError(
        f"Namespace {namespace.url!r} not found: nothing exists at {root!r}{connection}{detail}. "
        "Check the bucket and prefix, or create the namespace first."
    )


def _resolve_local_link(path: str, real_root: str, relative: str, namespace: Namespace) -> Mapping[str, Any]:
    """Return the listing entry of a symlink's target, rejecting targets outside the namespace."""
    target = os.path.realpath(path)
    # A symlink in a shared namespace folder would otherwise copy any file the worker can read.
    if os.path.commonpath([real_root, target]) != real_root:
        from kestra_perf_provider.exceptions import UnsafePathError

        raise UnsafePathError(
            f"Unsafe symlink {relative!r} in namespace {namespace.url!r}: it points to {target}, outside "
            "the namespace. Replace it with the file itself, or remove it."
        )
    try:
        status = os.stat(target)
    except FileNotFoundError:
        return {"type": "broken-link"}
    kind = "file" if stat.S_ISREG(status.st_mode) else "other"
    return {"type": kind, "size": status.st_size, "mtime": status.st_mtime, "name": path}
