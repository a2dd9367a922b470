from __future__ import annotations

import os

import pytest

from kestra_perf_provider.exceptions import (
    InvalidNamespaceError,
    NamespaceFilesConfigError,
    NamespaceNotFoundError,
    UnknownConnectionError,
    UnsafePathError,
)
from kestra_perf_provider.namespace_files.sources import (
    Namespace,
    check_folders,
    coerce_namespaces,
    file_identity,
    list_namespace,
    open_filesystem,
)


def list_local(path):
    namespace = Namespace(f"file://{path}")
    return list_namespace(open_filesystem(namespace, max_connections=4), namespace, 0)


class TestCoerceNamespaces:
    def test_single_url(self):
        assert coerce_namespaces("s3://bucket/ns") == [Namespace("s3://bucket/ns")]

    def test_mapping_and_objects_mixed(self):
        namespaces = coerce_namespaces(
            [{"url": "s3://b/a", "conn_id": "aws_default", "folder": "a"}, Namespace("memory://x")]
        )
        assert namespaces[0].conn_id == "aws_default"
        assert namespaces[0].folder_name == "a"
        assert namespaces[1].protocol == "memory"

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            pytest.param(None, "Missing namespaces", id="none"),
            pytest.param([], "the list is empty", id="empty-list"),
            pytest.param("bucket/prefix", "needs an absolute path", id="relative-path"),
            pytest.param("s3://", "names no bucket or path", id="no-bucket"),
            pytest.param("  ", "Invalid namespace URL", id="blank"),
            pytest.param([{"uri": "s3://b"}], "unknown keys: \\['uri'\\]", id="wrong-key"),
            pytest.param([42], "of type int", id="wrong-type"),
        ],
    )
    def test_invalid_rejected(self, value, message):
        with pytest.raises((NamespaceFilesConfigError, InvalidNamespaceError), match=message):
            coerce_namespaces(value)

    def test_relative_path_error_suggests_fix(self):
        with pytest.raises(InvalidNamespaceError, match="write 'file:///"):
            coerce_namespaces("ns/team-a")


class TestNamespaceUrl:
    @pytest.mark.parametrize(
        ("url", "protocol", "root", "folder"),
        [
            ("s3://bucket/ns/team-a/", "s3", "bucket/ns/team-a", "team-a"),
            ("file:///srv/ns", "file", "/srv/ns", "ns"),
            ("/srv/ns", "file", "/srv/ns", "ns"),
            ("gs://bucket", "gs", "bucket", "bucket"),
        ],
    )
    def test_parts(self, url, protocol, root, folder):
        namespace = Namespace(url)
        assert namespace.protocol == protocol
        assert namespace.root == root
        assert namespace.folder_name == folder


class TestOpenFilesystem:
    def test_unknown_protocol(self):
        with pytest.raises(InvalidNamespaceError, match="no fsspec filesystem handles protocol 'nosuchfs'"):
            open_filesystem(Namespace("nosuchfs://bucket/x"), max_connections=4)

    def test_unknown_connection(self, monkeypatch):
        monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONNECTION", raising=False)
        with pytest.raises(UnknownConnectionError, match="Unknown Airflow connection 'no_such_connection'"):
            open_filesystem(Namespace("s3://bucket/ns", conn_id="no_such_connection"), max_connections=4)

    def test_s3_pool_sized_to_cap(self):
        fs = open_filesystem(Namespace("s3://bucket/ns", storage_options={"anon": True}), max_connections=7)
        assert fs.config_kwargs["max_pool_connections"] == 7


class TestListNamespace:
    def test_nested_tree(self, tmp_path):
        (tmp_path / "a" / "b").mkdir(parents=True)
        (tmp_path / "top.txt").write_text("1")
        (tmp_path / "a" / "b" / "deep file é.txt").write_text("22")
        (tmp_path / "empty.bin").write_bytes(b"")
        files = {remote.relative: remote.size for remote in list_local(tmp_path)}
        assert files == {"top.txt": 1, "a/b/deep file é.txt": 2, "empty.bin": 0}

    def test_empty_folder_is_empty_namespace(self, tmp_path):
        assert list_local(tmp_path) == []

    def test_missing_namespace(self, tmp_path):
        with pytest.raises(NamespaceNotFoundError, match="not found: nothing exists at"):
            list_local(tmp_path / "missing")

    def test_file_is_not_a_namespace(self, tmp_path):
        (tmp_path / "f.txt").write_text("x")
        with pytest.raises(InvalidNamespaceError, match="names a file, not a folder"):
            list_local(tmp_path / "f.txt")

    def test_local_identity_is_size_and_mtime(self, tmp_path):
        (tmp_path / "f.txt").write_text("x")
        [remote] = list_local(tmp_path)
        assert remote.identity.startswith("size-mtime:1:")


class TestFileIdentity:
    @pytest.mark.parametrize(
        ("info", "expected"),
        [
            ({"VersionId": "v1", "ETag": '"abc"', "size": 1}, "version:v1"),
            ({"ETag": '"abc"', "size": 1, "LastModified": "t"}, "checksum:abc"),
            ({"size": 3, "mtime": 12.5}, "size-mtime:3:12.5"),
            ({"size": 3}, None),
        ],
    )
    def test_strongest_first(self, info, expected):
        assert file_identity(info) == expected


class TestLocalLinksAndUrls:
    def test_symlinked_folder_skipped(self, tmp_path):
        root = tmp_path / "ns"
        (root / "real").mkdir(parents=True)
        (root / "real" / "x.txt").write_text("x")
        os.symlink(root / "real", root / "linkdir")
        assert [remote.relative for remote in list_local(root)] == ["real/x.txt"]

    def test_symlinked_folder_outside_rejected(self, tmp_path):
        (tmp_path / "outside").mkdir()
        root = tmp_path / "ns"
        root.mkdir()
        os.symlink(tmp_path / "outside", root / "linkdir")
        with pytest.raises(UnsafePathError, match="Unsafe symlink 'linkdir'"):
            list_local(root)

    def test_symlink_escaping_root_rejected(self, tmp_path):
        (tmp_path / "secret.txt").write_text("secret")
        root = tmp_path / "ns"
        root.mkdir()
        os.symlink(tmp_path / "secret.txt", root / "link.txt")
        with pytest.raises(UnsafePathError, match="Unsafe symlink 'link.txt'.*outside the namespace"):
            list_local(root)

    def test_symlink_inside_root_allowed(self, tmp_path):
        root = tmp_path / "ns"
        root.mkdir()
        (root / "real.txt").write_text("real")
        os.symlink(root / "real.txt", root / "alias.txt")
        assert sorted(remote.relative for remote in list_local(root)) == ["alias.txt", "real.txt"]

    @pytest.mark.parametrize("url", ["file:ns/shared", "file://tmp/ns", "file://otherhost/srv/ns"])
    def test_file_url_needs_absolute_path(self, url):
        with pytest.raises(InvalidNamespaceError, match="a file URL needs an absolute path and no host"):
            coerce_namespaces(url)

    def test_unknown_protocol_rejected_when_parsed(self):
        with pytest.raises(InvalidNamespaceError, match="protocol 'nosuchproto'"):
            coerce_namespaces("nosuchproto://bucket/x")

    def test_same_folder_names_rejected(self):
        namespaces = coerce_namespaces(["s3://a/ns/shared", "s3://b/ns/shared"])
        with pytest.raises(NamespaceFilesConfigError, match="both be staged into folder 'shared'"):
            check_folders(namespaces)
        check_folders([namespaces[0], Namespace("s3://b/ns/shared", folder="shared-2")])
