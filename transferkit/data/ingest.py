"""ingest_data: read, validate and split the labelled target dataset.

Output folder (the KFP ``Dataset`` artifact)::

    train.parquet  validation.parquet  test.parquet   columns: text (string), label (int32 id)
    label_map.json                                     ids → raw values and display names
    stats.json                                         rows, class balance, duplicates, overlap,
                                                       fingerprint, sources
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.data.dataset import SPLITS, LabelMap
from transferkit.data.readers import detect_format, read_table
from transferkit.errors import DataError

log = logging.getLogger(__name__)


class IngestResult(BaseModel):
    """What ingest_data wrote, for KFP metadata and the run summary."""

    fingerprint: str
    rows: dict[str, int]
    labels: list[str]
    class_balance: dict[str, dict[str, int]]
    duplicate_texts: int
    conflicting_duplicates: int
    overlap: dict[str, int]
    sources: dict[str, str]
    seconds: float


def _read(uri: str, config: PipelineConfig, scratch: Path) -> pd.DataFrame:
    fmt = detect_format(storage.parse(uri).name, config.data.format)
    path = storage.fetch_file(uri, scratch, config.storage)
    frame = read_table(path, uri, fmt, config.data.text_column, config.data.label_column)
    log.info("read %s rows from %s", f"{len(frame):,}", uri)
    return frame


def _stratified_take(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask selecting ``fraction`` of every class, reproducibly."""
    mask = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        index = np.flatnonzero(labels == value)
        take = round(len(index) * fraction)
        mask[rng.permutation(index)[:take]] = True
    return mask


def _carve(
    frame: pd.DataFrame,
    fraction: float,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    mask = _stratified_take(frame["label"].to_numpy(), fraction, rng)
    return frame[~mask].reset_index(drop=True), frame[mask].reset_index(drop=True)


def _cap(frame: pd.DataFrame, max_rows: int | None, rng: np.random.Generator) -> pd.DataFrame:
    if not max_rows or len(frame) <= max_rows:
        return frame
    keep = _stratified_take(frame["label"].to_numpy(), max_rows / len(frame), rng)
    log.info("sampled %s of %s rows (data.max_rows)", f"{keep.sum():,}", f"{len(frame):,}")
    return frame[keep].reset_index(drop=True)


def _split(config: PipelineConfig, scratch: Path) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    data = config.data
    rng = np.random.default_rng(data.split.seed)
    sources: dict[str, str] = {}
    if data.uri:
        rows = _cap(_read(data.uri, config, scratch), data.max_rows, rng)
        sources = dict.fromkeys(SPLITS, data.uri)
        rest, test = _carve(rows, data.split.test, rng)
        # The validation fraction is of all rows, so rescale it to what is left.
        train, validation = _carve(rest, data.split.validation / (1 - data.split.test), rng)
    else:
        assert data.train_uri is not None  # guaranteed by DataConfig validation
        train = _cap(_read(data.train_uri, config, scratch), data.max_rows, rng)
        sources["train"] = data.train_uri
        if data.test_uri:
            test = _read(data.test_uri, config, scratch)
            sources["test"] = data.test_uri
        else:
            train, test = _carve(train, data.split.test, rng)
            sources["test"] = f"{data.train_uri} (held out {data.split.test:.0%})"
        if data.validation_uri:
            validation = _read(data.validation_uri, config, scratch)
            sources["validation"] = data.validation_uri
        else:
            fraction = data.split.validation / (1 - (0 if data.test_uri else data.split.test))
            train, validation = _carve(train, fraction, rng)
            sources["validation"] = f"{data.train_uri} (held out {data.split.validation:.0%})"
    return {"train": train, "validation": validation, "test": test}, sources


def _check(
    splits: dict[str, pd.DataFrame], sources: dict[str, str], config: PipelineConfig
) -> None:
    train = splits["train"]
    if train.empty:
        raise DataError(f"{sources['train']}: training split is empty; provide more rows")
    classes = train["label"].unique()
    if len(classes) < 2:
        raise DataError(
            f"{sources['train']}: training split has a single class ('{classes[0]}'); at least "
            f"two labels are needed — check data.label_column ('{config.data.label_column}')"
        )
    seen = set(classes)
    for name in ("validation", "test"):
        frame = splits[name]
        if frame.empty:
            raise DataError(
                f"{sources[name]}: {name} split is empty; give data.{name}_uri or raise "
                f"data.split.{name}"
            )
        unseen = sorted(set(frame["label"].unique()) - seen)
        if unseen:
            count = int(frame["label"].isin(unseen).sum())
            shown = ", ".join(repr(v) for v in unseen[:5])
            raise DataError(
                f"{sources[name]}: {name} split has labels never seen in training: {shown} "
                f"({count} rows); add training examples of those labels or remove the rows"
            )


def _fingerprint(splits: dict[str, pd.DataFrame], label_map: LabelMap) -> str:
    """Content hash of the canonical rows: identical data gives identical fingerprints."""
    digest = hashlib.sha256()
    digest.update(label_map.model_dump_json().encode())
    for name in SPLITS:
        frame = splits[name]
        digest.update(f"\0{name}\0{len(frame)}\0".encode())
        for text, label in zip(frame["text"], frame["label"], strict=True):
            digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()


def ingest_data(config: PipelineConfig, output_dir: Path) -> IngestResult:
    """Read the configured splits, validate them and write the dataset artifact.

    Args:
        config: the run configuration (``data`` and ``storage`` are used).
        output_dir: folder to create; written atomically, so a failure leaves nothing.

    Returns:
        Row counts, class balance, duplicate/overlap report and the content fingerprint.

    Raises:
        DataError: a split is unreadable or fails validation (one line: file, row, fix).
        StorageError: a URI cannot be read.
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transferkit-ingest-") as scratch:
        raw_splits, sources = _split(config, Path(scratch))
    _check(raw_splits, sources, config)
    label_map = LabelMap.from_values(raw_splits["train"]["label"].unique(), config.data.label_names)
    splits = {
        name: frame.assign(label=label_map.encode(frame["label"]).astype("int32"))
        for name, frame in raw_splits.items()
    }

    train_texts = splits["train"]["text"]
    duplicated = train_texts.duplicated(keep=False)
    conflicting = int(splits["train"][duplicated].groupby("text")["label"].nunique().gt(1).sum())
    train_set = set(train_texts)
    overlap = {
        name: int(splits[name]["text"].isin(train_set).sum()) for name in ("validation", "test")
    }
    if overlap["test"]:
        log.warning(
            "%d evaluation texts also occur in training; the evaluation may be optimistic",
            overlap["test"],
        )
    if conflicting:
        log.warning("%d training texts occur with different labels", conflicting)

    fingerprint = _fingerprint(splits, label_map)
    result = IngestResult(
        fingerprint=fingerprint,
        rows={name: len(frame) for name, frame in splits.items()},
        labels=label_map.names,
        class_balance={
            name: {
                label_map.names[i]: int(c)
                for i, c in enumerate(np.bincount(frame["label"], minlength=len(label_map)))
            }
            for name, frame in splits.items()
        },
        duplicate_texts=int(train_texts.duplicated().sum()),
        conflicting_duplicates=conflicting,
        overlap=overlap,
        sources=sources,
        seconds=round(time.perf_counter() - started, 3),
    )
    with storage.atomic_dir(output_dir) as tmp:
        for name, frame in splits.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
        storage.write_json(tmp / "label_map.json", label_map.model_dump())
        storage.write_json(tmp / "stats.json", result.model_dump())
    log.info(
        "ingested %s: %s",
        fingerprint[:12],
        ", ".join(f"{k} {v:,}" for k, v in result.rows.items()),
    )
    return result
