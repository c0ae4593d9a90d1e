"""extract_features: embed every split with the frozen backbone, cached by content.

Output folder (the KFP ``Dataset`` artifact)::

    train.npy  validation.npy  test.npy   float32 [rows, hidden], rows in dataset order
    features.json                         key, dims, pooling, precision, timing, cache hit

The cache key is (data fingerprint, backbone fingerprint, pooling, normalisation, max length,
precision): content, not URIs, so changed data behind an unchanged path is re-embedded and an
identical rerun is a file link. A cache entry also holds ``checksums.json`` (size and sha256
of each array), written after the arrays; a hit is served only when every array matches it,
so a truncated or altered entry (a full disk, a crash, an edit through a hard link) is
logged and embedded again, never served.

``runtime.feature_cache`` may be an ``s3://bucket/prefix`` shared by the pods of every node.
An entry there is ``<prefix>/<key>/<version>/{train,validation,test}.npy, features.json``
and then, uploaded last, ``<prefix>/<key>/checksums.json``, where ``<version>`` is derived
from the checksums themselves. A reader trusts only files that match the checksums it read,
so an upload cut short (files, no checksums) is a miss, logged, embedded and uploaded again.
Two pods that fill one key at once both succeed: a version folder only ever receives the
bytes its name stands for, so whichever checksums.json lands last names a complete folder,
even when two devices computed slightly different numbers for one key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from transferkit import storage
from transferkit.backbones import BackboneInfo, load_backbone_info
from transferkit.config import PipelineConfig
from transferkit.data import SPLITS
from transferkit.errors import StorageError

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"

# Bump when the layout or the numerics of stored features change, to invalidate old caches.
FEATURE_FORMAT = 2  # 2: text splits encoded in chunks of CHUNK_TEXTS


class FeaturesResult(BaseModel):
    """What extract_features produced."""

    key: str
    dim: int
    rows: dict[str, int]
    pooling: str
    normalize: bool
    max_length: int
    precision: str
    cache_hit: bool
    seconds: float
    texts_per_second: float | None = None
    runtime: str = "torch"  # what embedded them: 'torch', or 'openvino' (backbones/compiled.py)


def feature_key(
    data_fingerprint: str,
    backbone_fingerprint: str,
    pooling: str,
    normalize: bool,
    max_length: int,
    precision: str,
    image: dict[str, Any] | None = None,
    runtime: str = "torch",
) -> str:
    """Cache key of a feature set: everything that changes the numbers, nothing else."""
    fields: dict[str, Any] = {
        "data": data_fingerprint,
        "backbone": backbone_fingerprint,
        "pooling": pooling,
        "normalize": normalize,
        "max_length": max_length,
        "precision": precision,
        "format": FEATURE_FORMAT,
    }
    if image is not None:  # input adaptation of a vision backbone
        fields["image"] = image
    if runtime != "torch":  # another runtime's numerics (torch's keys stay as they were)
        fields["runtime"] = runtime
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def load_features(features_dir: Path, split: str) -> np.ndarray:
    """Feature matrix of one split."""
    return np.load(features_dir / f"{split}.npy")


def save_rows(path: Path, rows: int, chunks: Iterable[np.ndarray]) -> int:
    """Write float32 row blocks as one ``.npy`` file [rows, width] without holding them all.

    The header is written from the first block's width; every block is appended as it comes,
    so memory holds one block, not the matrix. ``np.load`` reads the file as usual.

    Returns:
        The width (0 when there are no rows).

    Raises:
        ValueError: the blocks do not add up to ``rows`` rows of one width.
    """
    width, written = 0, 0
    with path.open("wb") as out:
        for block in chunks:
            if written == 0:
                width = int(block.shape[1])
                np.lib.format.write_array_header_1_0(
                    out, {"descr": "<f4", "fortran_order": False, "shape": (rows, width)}
                )
            if block.shape[1] != width:
                raise ValueError(f"{path.name}: a block of width {block.shape[1]}, not {width}")
            out.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
            written += len(block)
        if written == 0:
            np.save(out, np.zeros((0, 0), dtype=np.float32))
    if written != rows:
        raise ValueError(f"{path.name}: {written} rows written, {rows} announced")
    return width


def _embedder(
    config: PipelineConfig,
    info: BackboneInfo,
    backbone_dir: Path,
    dataset_dir: Path,
    precision: str,
    runtime: str,
) -> tuple[Callable[[str, Path], tuple[int, int]], str]:
    """(split name, .npy path) → (rows, width) written, with the frozen encoder loaded once,
    and the runtime it really runs on (a failed compilation falls back to torch).

    Text splits are encoded and written a chunk at a time, so memory does not grow with the
    number of rows.
    """
    from torch import nn

    from transferkit.backbones.base import folder_family
    from transferkit.backbones.modality import modality_of
    from transferkit.training.runtime import device

    batch = config.evaluation.batch_size
    modality = modality_of(info.modality)
    family = folder_family(backbone_dir / "model", info.family)
    processor, encoder = family.load(backbone_dir / "model", info.modality, info)
    module, precision = modality.frozen(encoder.to(device()), precision, processor, runtime)
    runtime = "torch" if isinstance(module, nn.Module) else runtime

    def embed(split: str, path: Path) -> tuple[int, int]:
        inputs, _ = modality.load(dataset_dir, split)
        blocks = modality.stream(
            module, processor, inputs, info, batch, precision, f"embed {split}"
        )
        return len(inputs), save_rows(path, len(inputs), blocks)

    return embed, runtime


def _checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a cache entry (the arrays and features.json)."""
    return {
        path.name: {"size": path.stat().st_size, "sha256": storage.sha256_file(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != CHECKSUMS
    }


def _damage(entry: Path) -> str | None:
    """What is wrong with a cache entry's files, or None when each matches its checksum."""
    try:
        expected: dict[str, dict[str, Any]] = storage.read_json(entry / CHECKSUMS)
    except FileNotFoundError:
        return f"no {CHECKSUMS}"
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    needed = {f"{split}.npy" for split in SPLITS} | {"features.json"}
    if missing := sorted(needed - set(expected)):
        return f"{CHECKSUMS} does not list {missing[0]}"
    for name, want in sorted(expected.items()):
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if (size := path.stat().st_size) != want.get("size"):
            return f"{name} is {size} bytes, {want.get('size')} recorded"
        if storage.sha256_file(path) != want.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def _intact(entry: Path, name: str | None = None) -> bool:
    """Whether a cache entry can be served; a damaged one is logged in one line under
    ``name`` (default: the folder's name, the key)."""
    damage = _damage(entry)
    if damage is not None:
        log.warning(
            "feature cache entry %s is damaged (%s): embedding again", name or entry.name, damage
        )
    return damage is None


@contextlib.contextmanager
def _naming_the_setting() -> Iterator[None]:
    """Storage errors of the shared cache say which setting they come from; transient ones
    stay transient (``transferkit.retry``)."""
    try:
        yield
    except StorageError as error:
        raise StorageError(f"runtime.feature_cache: {error}", transient=error.transient) from None


def _version(checksums: dict[str, Any]) -> str:
    """Folder name of the files an S3 entry's checksums describe: a digest of the checksums,
    so one folder never receives two different contents."""
    return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()[:16]


def _fetch_remote(config: PipelineConfig, key: str, scratch: Path) -> bool:
    """Download the S3 cache entry of ``key`` into ``scratch`` (arrays, features.json and
    checksums.json, as a local entry) and say whether it can be served. A partial or
    damaged entry is logged in one line and is a miss."""
    entry = f"{config.feature_cache.rstrip('/')}/{key}"
    with _naming_the_setting():
        names = set(storage.list_names(entry, config.storage))
        if not names:
            return False
        if CHECKSUMS not in names:  # an upload cut short, or still under way
            log.warning(
                "feature cache entry %s is damaged (no %s): embedding again", entry, CHECKSUMS
            )
            return False
        storage.fetch_tree(entry, scratch, [CHECKSUMS], config.storage)
        try:
            expected = storage.read_json(scratch / CHECKSUMS)
        except ValueError:
            expected = None
        if not isinstance(expected, dict):
            log.warning(
                "feature cache entry %s is damaged (%s is unreadable): embedding again",
                entry,
                CHECKSUMS,
            )
            return False
        version = _version(expected)
        # Only what is there: a listed file that is not is reported missing by _damage.
        present = [name for name in expected if f"{version}/{name}" in names]
        storage.fetch_tree(f"{entry}/{version}", scratch, present, config.storage)
    return _intact(scratch, entry)


def _upload_remote(config: PipelineConfig, key: str, folder: Path) -> None:
    """Upload a finished feature artifact as the S3 cache entry of ``key``: the files into
    their version folder first, its checksums.json last."""
    entry = f"{config.feature_cache.rstrip('/')}/{key}"
    checksums = _checksums(folder)
    version = _version(checksums)
    with _naming_the_setting(), tempfile.TemporaryDirectory(prefix="transferkit-") as scratch:
        for name in checksums:
            storage.upload_file(folder / name, f"{entry}/{version}/{name}", config.storage)
        storage.write_json(Path(scratch) / CHECKSUMS, checksums)
        storage.upload_file(Path(scratch) / CHECKSUMS, f"{entry}/{CHECKSUMS}", config.storage)
    log.info("feature cache entry uploaded to %s", entry)


def _serve(entry: Path, output_dir: Path, started: float) -> FeaturesResult:
    """The artifact from an intact cache entry, its files linked (or copied)."""
    recorded = storage.read_json(entry / "features.json")
    result = FeaturesResult(
        **{**recorded, "cache_hit": True, "seconds": round(time.perf_counter() - started, 3)}
    )
    with storage.atomic_dir(output_dir) as tmp:
        for split in SPLITS:
            storage.link_or_copy(entry / f"{split}.npy", tmp / f"{split}.npy")
        storage.write_json(tmp / "features.json", result.model_dump())
    log.info("features served from cache %s", result.key[:12])
    return result


def extract_features(
    config: PipelineConfig, dataset_dir: Path, backbone_dir: Path, output_dir: Path
) -> FeaturesResult:
    """Embed every split of the dataset with the frozen backbone.

    Args:
        config: the run configuration (``training.precision``, ``evaluation.batch_size``,
            ``runtime``).
        dataset_dir: the ingest_data artifact.
        backbone_dir: the fetch_backbone artifact.
        output_dir: folder to create atomically.

    Returns:
        The cache key, shapes, timing and whether the cache served the result.
    """
    from transferkit.backbones.text import resolve_precision
    from transferkit.training.runtime import configure_torch, device

    started = time.perf_counter()
    configure_torch(config)
    from transferkit.backbones.modality import modality_of

    info = load_backbone_info(backbone_dir)
    stats = storage.read_json(dataset_dir / "stats.json")
    target = device()
    precision = resolve_precision(config.training.precision, target)
    modality = modality_of(info.modality)
    runtime = modality.runtime(target, precision, sum(stats.get("rows", {}).values()))
    key = feature_key(
        stats["fingerprint"],
        info.fingerprint,
        info.pooling,
        info.normalize,
        info.max_length,
        precision,
        info.image.model_dump() if info.image else None,
        runtime,
    )
    remote = storage.parse(config.feature_cache).scheme == "s3"
    # The local entry; an S3 cache has none (the node's disk holds nothing between runs).
    cached = Path() if remote else storage.local_path(config.feature_cache) / key
    base = {
        "key": key,
        "pooling": info.pooling,
        "normalize": info.normalize,
        "max_length": info.max_length,
        "precision": precision,
    }

    if remote:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        # Next to the artifact, so serving links the downloaded files rather than copying.
        with tempfile.TemporaryDirectory(
            prefix=f".{output_dir.name}.", suffix=".cache", dir=output_dir.parent
        ) as scratch:
            if _fetch_remote(config, key, Path(scratch)):
                return _serve(Path(scratch), output_dir, started)
    elif (cached / "features.json").exists() and _intact(cached):
        return _serve(cached, output_dir, started)

    embed, runtime = _embedder(config, info, backbone_dir, dataset_dir, precision, runtime)
    rows: dict[str, int] = {}
    dim = 0
    encode_seconds = 0.0
    with storage.atomic_dir(output_dir) as tmp:
        for split in SPLITS:
            t0 = time.perf_counter()
            rows[split], width = embed(split, tmp / f"{split}.npy")
            encode_seconds += time.perf_counter() - t0
            dim = dim or width
        total_texts = sum(rows.values())
        result = FeaturesResult(
            **base,
            dim=dim,
            rows=rows,
            cache_hit=False,
            seconds=round(time.perf_counter() - started, 3),
            texts_per_second=round(total_texts / max(encode_seconds, 1e-9), 1),
            runtime=runtime,
        )
        storage.write_json(tmp / "features.json", result.model_dump())
    # Populate the cache from the finished artifact; a crash here costs a cache miss, never
    # a half-written entry (atomic_dir, or checksums uploaded last), and the checksums catch
    # what happens to it later.
    if remote:
        _upload_remote(config, key, output_dir)
    else:
        with storage.atomic_dir(cached) as entry:
            storage.link_or_copy_tree(output_dir, entry)
            storage.write_json(entry / CHECKSUMS, _checksums(entry))
    what = modality.noun
    log.info(
        "embedded %s %s at %.0f %s/s (%s, %s)",
        f"{total_texts:,}",
        what,
        result.texts_per_second or 0,
        what,
        precision,
        runtime,
    )
    return result
