"""ingest_data and fetch_backbone reading from a real S3 server (SeaweedFS)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import make_config
from tests.integration.conftest import S3Server
from transferkit import storage
from transferkit.backbones import fetch_backbone
from transferkit.data import ingest_data
from transferkit.errors import BackboneError, StorageError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server, sst2_small: dict[str, Path], minilm_dir: Path) -> str:
    client = s3_server.client()
    client.create_bucket(Bucket="transferkit")
    client.upload_file(str(sst2_small["train"]), "transferkit", "sst2/train.tsv")
    client.upload_file(str(sst2_small["test"]), "transferkit", "sst2/dev.tsv")
    for path in minilm_dir.rglob("*"):
        if path.is_file():
            key = f"backbones/minilm/{path.relative_to(minilm_dir).as_posix()}"
            client.upload_file(str(path), "transferkit", key)
    return "transferkit"


def s3_config(tmp_path: Path, server: S3Server, **data: str):
    return make_config(
        tmp_path,
        {
            "train_uri": "s3://transferkit/sst2/train.tsv",
            "test_uri": "s3://transferkit/sst2/dev.tsv",
            **data,
        },
        storage={"s3_endpoint_url": server.endpoint},
        backbone={"uri": "s3://transferkit/backbones/minilm/"},
    )


def test_ingest_from_s3_equals_ingest_from_files(
    tmp_path: Path, s3_env: S3Server, bucket: str, sst2_small: dict[str, Path]
) -> None:
    remote = ingest_data(s3_config(tmp_path, s3_env), tmp_path / "remote")
    local = ingest_data(
        make_config(
            tmp_path, {"train_uri": str(sst2_small["train"]), "test_uri": str(sst2_small["test"])}
        ),
        tmp_path / "local",
    )
    assert remote.fingerprint == local.fingerprint
    assert remote.rows == local.rows
    assert remote.sources["train"] == "s3://transferkit/sst2/train.tsv"


def test_fetch_backbone_from_s3_prefix(tmp_path: Path, s3_env: S3Server, bucket: str) -> None:
    remote = fetch_backbone(s3_config(tmp_path, s3_env), tmp_path / "remote")
    local = fetch_backbone(
        make_config(tmp_path, {"train_uri": "t.tsv", "test_uri": "d.tsv"}), tmp_path / "local"
    )
    assert remote.fingerprint == local.fingerprint
    assert remote.parameters == 22_713_216
    assert remote.source == "s3://transferkit/backbones/minilm/"


def test_stamp_follows_object_content(s3_env: S3Server, bucket: str) -> None:
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="stamp/x.tsv", Body=b"sentence\tlabel\na\t1\n")
    config = make_config(
        Path("/tmp"),
        {"train_uri": "t", "test_uri": "d"},
        storage={"s3_endpoint_url": s3_env.endpoint},
    )
    first = storage.stamp("s3://transferkit/stamp/x.tsv", config.storage)
    assert storage.stamp("s3://transferkit/stamp/x.tsv", config.storage) == first
    client.put_object(Bucket=bucket, Key="stamp/x.tsv", Body=b"sentence\tlabel\nb\t0\n")
    assert storage.stamp("s3://transferkit/stamp/x.tsv", config.storage) != first
    assert storage.stamp("s3://transferkit/backbones/minilm/", config.storage) != first


def test_missing_bucket_and_key(tmp_path: Path, s3_env: S3Server, bucket: str) -> None:
    config = make_config(
        tmp_path,
        {"train_uri": "s3://no-such-bucket/train.tsv", "test_uri": "s3://transferkit/sst2/dev.tsv"},
        storage={"s3_endpoint_url": s3_env.endpoint},
    )
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/train\.tsv: "):
        ingest_data(config, tmp_path / "ds")
    config = make_config(
        tmp_path,
        {
            "train_uri": "s3://transferkit/sst2/nope.tsv",
            "test_uri": "s3://transferkit/sst2/dev.tsv",
        },
        storage={"s3_endpoint_url": s3_env.endpoint},
    )
    with pytest.raises(StorageError, match="no such object; check the key"):
        ingest_data(config, tmp_path / "ds")
    config = s3_config(tmp_path, s3_env)
    config.backbone.uri = "s3://transferkit/backbones/none/"
    with pytest.raises(BackboneError, match=r"no objects under this prefix|the folder is empty"):
        fetch_backbone(config, tmp_path / "bb")
    assert not (tmp_path / "ds").exists()
    assert not (tmp_path / "bb").exists()


def test_wrong_credentials_are_refused_without_leaking_them(
    tmp_path: Path, s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(StorageError) as info:
        ingest_data(s3_config(tmp_path, s3_server), tmp_path / "ds")
    message = str(info.value)
    assert re.search(
        r"S3 refused the request \((403|SignatureDoesNotMatch)\); check "
        r"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
        message,
    )
    assert "definitely-wrong-secret" not in message
    assert s3_server.access_key not in message
    assert not (tmp_path / "ds").exists()


def test_unreachable_endpoint(tmp_path: Path, s3_env: S3Server) -> None:
    config = make_config(
        tmp_path,
        {
            "train_uri": "s3://transferkit/sst2/train.tsv",
            "test_uri": "s3://transferkit/sst2/dev.tsv",
        },
        storage={"s3_endpoint_url": "http://127.0.0.1:9", "retries": 1},
    )
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        ingest_data(config, tmp_path / "ds")


def test_image_folder_and_npz_from_s3_equal_the_local_files(
    tmp_path: Path, s3_env: S3Server, bucket: str, shared_data: Path, resnet20: Path
) -> None:
    """Images read from S3 (a label-per-folder tree of PNGs and an npz) equal the local ones."""
    import numpy as np
    from PIL import Image

    from tests.conftest import image_config

    client = s3_env.client()
    with np.load(shared_data / "medmnist" / "breastmnist.npz") as archive:
        images, labels = archive["train_images"][:30], archive["train_labels"][:30]
    local = tmp_path / "local-folder"
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = local / ("malignant" if label == 0 else "benign") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        client.upload_file(str(path), bucket, f"breast/{path.relative_to(local).as_posix()}")
    npz = shared_data / "medmnist" / "breastmnist.npz"
    client.upload_file(str(npz), bucket, "breast.npz")
    storage_section = {"s3_endpoint_url": s3_env.endpoint}
    split = {"validation": 0.2, "test": 0.2, "seed": 3}
    pairs = [
        ({"uri": f"s3://{bucket}/breast/", "split": split}, {"uri": f"{local}/", "split": split}),
        ({"uri": f"s3://{bucket}/breast.npz"}, {"uri": str(npz)}),
    ]
    for index, (remote_data, local_data) in enumerate(pairs):
        remote = ingest_data(
            image_config(tmp_path, remote_data, resnet20, storage=storage_section),
            tmp_path / f"remote-{index}",
        )
        here = ingest_data(
            image_config(tmp_path, local_data, resnet20), tmp_path / f"local-{index}"
        )
        assert remote.fingerprint == here.fingerprint
        assert remote.rows == here.rows
        assert remote.modality == "image"


def test_backbone_cache_fetches_once_until_the_objects_change(
    tmp_path: Path, s3_env: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    downloads: list[str] = []
    real = storage.fetch_tree

    def counting(uri: str, *args: object, **kwargs: object) -> None:
        downloads.append(uri)
        real(uri, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "fetch_tree", counting)
    config = s3_config(tmp_path, s3_env)
    first = fetch_backbone(config, tmp_path / "first", cache_dir=cache)
    second = fetch_backbone(config, tmp_path / "second", cache_dir=cache)
    assert downloads == ["s3://transferkit/backbones/minilm/"]  # the second came from the cache
    assert first.fingerprint == second.fingerprint
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (entry / "_SUCCESS").read_text() == "s3://transferkit/backbones/minilm/"
    # A changed object behind the same prefix is a new cache entry, fetched again.
    s3_env.client().put_object(
        Bucket=bucket, Key="backbones/minilm/README.md", Body=b"# retrained elsewhere\n"
    )
    try:
        fetch_backbone(config, tmp_path / "third", cache_dir=cache)
    finally:
        s3_env.client().delete_object(Bucket=bucket, Key="backbones/minilm/README.md")
    assert len(downloads) == 2
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


@pytest.mark.timeout(300)  # a reader of a fifo may block for ever: fail instead
def test_a_tampered_backbone_cache_entry_is_refused(
    tmp_path: Path, s3_env: S3Server, bucket: str
) -> None:
    import os

    cache = tmp_path / "cache"
    config = s3_config(tmp_path, s3_env)
    fetch_backbone(config, tmp_path / "first", cache_dir=cache)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    (entry / "vocab.txt").unlink()
    os.mkfifo(entry / "vocab.txt")  # written into the shared PVC after caching
    with pytest.raises(StorageError) as info:
        fetch_backbone(config, tmp_path / "second", cache_dir=cache)
    assert str(info.value) == (
        f"backbone cache {entry}: 'vocab.txt' is not a plain file (a link or special file put "
        f"there after caching); refusing to use it — delete {entry}"
    )
    assert not (tmp_path / "second").exists()


def test_validate_finds_a_missing_s3_object_and_skips_s3_offline(
    tmp_path: Path, s3_env: S3Server, bucket: str
) -> None:
    from transferkit.preflight import problems

    config = s3_config(tmp_path, s3_env)
    assert problems(config) == []
    missing = s3_config(tmp_path, s3_env, test_uri="s3://transferkit/sst2/gone.tsv")
    assert problems(missing) == ["s3://transferkit/sst2/gone.tsv: no such object; check the key"]
    # The same line stops ingest.
    with pytest.raises(StorageError) as stopped:
        ingest_data(missing, tmp_path / "dataset")
    assert str(stopped.value) == problems(missing)[0]
    assert problems(missing, offline=True) == []
