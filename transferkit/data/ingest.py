"""ingest_data: read, validate and split the labelled target dataset.

Output folder (the KFP ``Dataset`` artifact)::

    train.parquet  validation.parquet  test.parquet   text: columns text (string), label (int32;
                                                       label sets: lists of ids; scores: float64),
                                                       text pairs: text_pair (string) too
                                                       images: columns label (int32), source
    train_images.npy  validation_images.npy  …         images only: uint8 [N, H, W, C]
    label_map.json                                     ids → raw values and display names
    stats.json                                         modality, rows, class balance, duplicates,
                                                       overlap, fingerprint, sources; for images
                                                       also size, channels, channel mean/std
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import TypeAlias

import numpy as np
import pandas as pd
from pydantic import BaseModel

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.data.dataset import SCORE, SPLITS, LabelMap
from transferkit.data.images import (
    ImageRows,
    csv_entries,
    folder_entries,
    read_image_files,
    read_npz,
)
from transferkit.data.readers import detect_format, read_table
from transferkit.data.sampling import quantile_bins
from transferkit.errors import DataError

log = logging.getLogger(__name__)


class ImageStats(BaseModel):
    """Shape and pixel statistics of the training images (scaled to [0, 1])."""

    height: int
    width: int
    channels: int
    mean: list[float]
    std: list[float]


class IngestResult(BaseModel):
    """What ingest_data wrote, for KFP metadata and the run summary."""

    modality: str = "text"
    task: str = "classification"  # multi_label: each row holds a set of labels (list of ids)
    pairs: bool = False  # each row holds two texts (data.text_pair_column)
    # task: regression: each split's targets (rows, min, max, mean, std), where a
    # classification dataset has its class balance.
    targets: dict[str, dict[str, float]] | None = None
    image: ImageStats | None = None
    fingerprint: str
    rows: dict[str, int]
    labels: list[str]
    class_balance: dict[str, dict[str, int]]
    duplicate_texts: int
    conflicting_duplicates: int
    overlap: dict[str, int]
    sources: dict[str, str]
    source_stamp: str = ""  # data_stamp(config) as the run began: what the trigger compares
    seconds: float


Rows: TypeAlias = pd.DataFrame | ImageRows


def _frame(rows: Rows) -> pd.DataFrame:
    return rows.frame if isinstance(rows, ImageRows) else rows


def _subset(rows: Rows, mask: np.ndarray) -> Rows:
    if isinstance(rows, ImageRows):
        return rows.take(np.flatnonzero(mask))
    return rows[mask].reset_index(drop=True)


def _image_format(uri: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = storage.parse(uri).name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".csv", ".tsv")):
        return "image_csv"
    return "image_folder"


def _read_images(
    uri: str, config: PipelineConfig, scratch: Path, split: str
) -> ImageRows | dict[str, ImageRows]:
    """Images of ``uri``; an npz holding several splits gives them all when ``split`` is 'all'."""
    data = config.data
    fmt = _image_format(uri, data.format)
    if fmt == "npz":
        splits = read_npz(storage.fetch_file(uri, scratch, config.storage), uri)
        if "all" in splits:
            return splits["all"]
        if split == "all":
            return splits
        if split not in splits:
            raise DataError(
                f"{uri}: no {split} arrays (has {', '.join(splits)}); give the {split} split "
                f"in another file or let data.split carve it"
            )
        return splits[split]
    mode = data.image_mode
    if fmt == "image_folder":
        names = storage.list_tree(uri, config.storage)
        entries = folder_entries(names, uri.rstrip("/"))
        root = _local_tree(uri, [rel for rel, _ in entries], config, scratch / "images")
        rows = read_image_files(
            entries, lambda rel: (root / rel).read_bytes(), uri.rstrip("/"), mode, data.image_size
        )
    else:
        path = storage.fetch_file(uri, scratch, config.storage)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        entries = csv_entries(frame, uri, data.image_column, data.label_column)
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        relative = [rel for rel, _ in entries if not _is_absolute(rel)]
        csv_root = _local_tree(base, relative, config, scratch / "images") if relative else None

        def read(rel: str) -> bytes:
            if _is_absolute(rel):
                return storage.fetch_file(rel, scratch / "abs", config.storage).read_bytes()
            assert csv_root is not None
            return (csv_root / rel).read_bytes()

        rows = read_image_files(entries, read, uri, mode, data.image_size)
    return rows


def _is_absolute(path: str) -> bool:
    """A URI (s3://, file://) or an absolute path: not relative to the CSV's folder."""
    return "://" in path or Path(path).is_absolute()


def _local_tree(uri: str, names: list[str], config: PipelineConfig, scratch: Path) -> Path:
    """A local folder holding ``names`` of the folder ``uri`` (downloaded only from S3)."""
    if storage.parse(uri).scheme == "s3":
        storage.fetch_tree(uri, scratch, names, config.storage)
        return scratch
    root = storage.local_path(uri)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DataError(f"{root / missing[0]}: no such image file; fix the path in the CSV")
    return root


NOUNS = {"text": "texts", "image": "images"}


def _read_pixels(
    uri: str, config: PipelineConfig, scratch: Path, split: str
) -> Rows | dict[str, ImageRows]:
    if config.data.text_pair_column:
        raise DataError(f"{uri}: images, not texts; data.text_pair_column pairs texts, remove it")
    rows = _read_images(uri, config, scratch, split)
    count = sum(map(len, rows.values())) if isinstance(rows, dict) else len(rows)
    log.info("read %s images from %s", f"{count:,}", uri)
    return rows


def _read_texts(
    uri: str, config: PipelineConfig, scratch: Path, split: str
) -> Rows | dict[str, ImageRows]:
    fmt = detect_format(storage.parse(uri).name, config.data.format)
    path = storage.fetch_file(uri, scratch, config.storage)
    data = config.data
    frame = read_table(
        path,
        uri,
        fmt,
        data.text_column,
        data.label_column,
        max_text_chars=data.max_text_chars,
        label_delimiter=data.label_delimiter if config.task == "multi_label" else None,
        columns=data.columns,
        pair_column=data.text_pair_column,
        numeric_labels=config.task == "regression",
    )
    log.info("read %s rows from %s", f"{len(frame):,}", uri)
    return frame


# How each kind of data file (data.modality, from its format) is read.
READERS = {"text": _read_texts, "image": _read_pixels}


def _read(
    uri: str, config: PipelineConfig, scratch: Path, split: str = "all"
) -> Rows | dict[str, ImageRows]:
    return READERS[config.data.modality](uri, config, scratch, split)


def _stratified_take(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask selecting ``fraction`` of every class, reproducibly."""
    mask = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        index = np.flatnonzero(labels == value)
        take = round(len(index) * fraction)
        mask[rng.permutation(index)[:take]] = True
    return mask


def _strata(labels: pd.Series) -> np.ndarray:
    """What a stratified split keeps in proportion: the label of each row, or for label sets
    (multi_label) the rarest label of each set ('' for an empty set): every label keeps about
    its share in each split, where stratifying on whole sets would leave rare combinations
    out of the smaller splits altogether."""
    values = labels.to_numpy()
    if values.dtype.kind == "f":  # scores (regression): their quantile bin
        return quantile_bins(values)
    if not len(values) or not isinstance(values[0], tuple):
        return values
    counts = pd.Series([label for labels in values for label in labels]).value_counts()
    rank = {label: i for i, label in enumerate(reversed(counts.index.tolist()))}  # rarest first
    return np.array([min(s, key=rank.__getitem__) if s else "" for s in values], dtype=object)


def _label_values(labels: pd.Series) -> set[str]:
    """The distinct labels of a column (the members of its sets, for multi_label)."""
    values = labels.to_numpy()
    if len(values) and isinstance(values[0], tuple):
        return {label for labels in values for label in labels}
    return set(values.tolist())


def _carve(rows: Rows, fraction: float, rng: np.random.Generator) -> tuple[Rows, Rows]:
    mask = _stratified_take(_strata(_frame(rows)["label"]), fraction, rng)
    return _subset(rows, ~mask), _subset(rows, mask)


def _cap(rows: Rows, max_rows: int | None, rng: np.random.Generator) -> Rows:
    if not max_rows or len(rows) <= max_rows:
        return rows
    keep = _stratified_take(_strata(_frame(rows)["label"]), max_rows / len(rows), rng)
    log.info("sampled %s of %s rows (data.max_rows)", f"{keep.sum():,}", f"{len(rows):,}")
    return _subset(rows, keep)


def _one(rows: Rows | dict[str, ImageRows]) -> Rows:
    assert not isinstance(rows, dict)  # only _read(split='all') returns several splits
    return rows


def _split(config: PipelineConfig, scratch: Path) -> tuple[dict[str, Rows], dict[str, str]]:
    data = config.data
    rng = np.random.default_rng(data.split.seed)
    sources: dict[str, str] = {}
    if data.uri:
        read = _read(data.uri, config, scratch)
        if isinstance(read, dict):  # an npz with its own (official) splits
            return _given_splits(read, config, rng)
        rows = _cap(read, data.max_rows, rng)
        sources = dict.fromkeys(SPLITS, data.uri)
        rest, test = _carve(rows, data.split.test, rng)
        # The validation fraction is of all rows, so rescale it to what is left.
        train, validation = _carve(rest, data.split.validation / (1 - data.split.test), rng)
    else:
        assert data.train_uri is not None  # guaranteed by DataConfig validation
        train = _cap(_one(_read(data.train_uri, config, scratch, "train")), data.max_rows, rng)
        sources["train"] = data.train_uri
        if data.test_uri:
            test = _one(_read(data.test_uri, config, scratch, "test"))
            sources["test"] = data.test_uri
        else:
            train, test = _carve(train, data.split.test, rng)
            sources["test"] = f"{data.train_uri} (held out {data.split.test:.0%})"
        if data.validation_uri:
            validation = _one(_read(data.validation_uri, config, scratch, "validation"))
            sources["validation"] = data.validation_uri
        else:
            fraction = data.split.validation / (1 - (0 if data.test_uri else data.split.test))
            train, validation = _carve(train, fraction, rng)
            sources["validation"] = f"{data.train_uri} (held out {data.split.validation:.0%})"
    return {"train": train, "validation": validation, "test": test}, sources


def _given_splits(
    read: dict[str, ImageRows], config: PipelineConfig, rng: np.random.Generator
) -> tuple[dict[str, Rows], dict[str, str]]:
    """The splits stored in one npz (MedMNIST's official ones); missing ones are carved."""
    uri = config.data.uri
    splits: dict[str, Rows] = {"train": _cap(read["train"], config.data.max_rows, rng)}
    sources = {"train": f"{uri} (train arrays)"}
    for name, key in (("test", "test"), ("validation", "val")):
        if name in read:
            splits[name] = read[name]
            sources[name] = f"{uri} ({key} arrays)"
        else:
            fraction = float(getattr(config.data.split, name))
            splits["train"], splits[name] = _carve(splits["train"], fraction, rng)
            sources[name] = f"{uri} (held out {fraction:.0%} of train)"
    return splits, sources


def _check(splits: dict[str, Rows], sources: dict[str, str], config: PipelineConfig) -> None:
    train = _frame(splits["train"])
    if train.empty:
        raise DataError(f"{sources['train']}: training split is empty; provide more rows")
    if config.task == "regression":
        _check_scores(splits, sources, config)
        return
    if config.task == "multi_label":
        if not isinstance(train["label"].iloc[0], tuple):
            raise DataError(
                f"{sources['train']}: task: multi_label reads label sets from a table's label "
                "column, and this data has one label per row (an image set); use task: "
                "classification"
            )
        classes = np.array(sorted(_label_values(train["label"])), dtype=object)
        if not len(classes):
            raise DataError(
                f"{sources['train']}: no training row has a label; label some rows in column "
                f"'{config.data.label_column}'"
            )
    else:
        classes = train["label"].unique()
    if len(classes) < 2 and config.task != "multi_label":
        raise DataError(
            f"{sources['train']}: training split has a single class ('{classes[0]}'); at least "
            f"two labels are needed — check data.label_column ('{config.data.label_column}')"
        )
    seen = set(classes)
    for name in ("validation", "test"):
        frame = _frame(splits[name])
        if frame.empty and len(classes) > 0.5 * len(train) + 1:
            raise DataError(
                f"{sources['train']}: column '{config.data.label_column}' holds "
                f"{len(classes):,} distinct values in {len(train):,} training rows (e.g. "
                f"{str(classes[0])[:40]!r}) — an id or a text, not a class label, so no "
                f"{name} split can hold every label; point data.label_column at the label"
            )
        if frame.empty:
            raise _empty(sources, name)
        unseen = sorted(_label_values(frame["label"]) - seen)
        if unseen:
            strays = set(unseen)
            count = int(sum(bool(strays.intersection(_members(v))) for v in frame["label"]))
            shown = ", ".join(repr(v) for v in unseen[:5])
            raise DataError(
                f"{sources[name]}: {name} split has labels never seen in training: {shown} "
                f"({count} rows); add training examples of those labels or remove the rows"
            )
    if isinstance(splits["train"], ImageRows):
        shapes = {
            name: rows.images.shape[1:]
            for name, rows in splits.items()
            if isinstance(rows, ImageRows)
        }
        for name in ("validation", "test"):
            if shapes[name] != shapes["train"]:
                h, w, c = shapes[name]
                th, tw, tc = shapes["train"]
                raise DataError(
                    f"{sources[name]}: {name} images are {w}×{h}×{c} but training images are "
                    f"{tw}×{th}×{tc}; set data.image_size / data.image_mode to make them agree"
                )


def _check_scores(splits: dict[str, Rows], sources: dict[str, str], config: PipelineConfig) -> None:
    """Regression targets: numbers (read as such), no empty split, not all one value."""
    train = _frame(splits["train"])
    if train["label"].dtype.kind != "f":
        raise DataError(
            f"{sources['train']}: task: regression reads a number per row from a table's "
            "label column, and this data has classes (an image set); use task: classification"
        )
    if train["label"].nunique() < 2:
        raise DataError(
            f"{sources['train']}: every training target in column "
            f"'{config.data.label_column}' is {train['label'].iloc[0]:g}; a regression needs "
            "targets that vary — check data.label_column"
        )
    for name in ("validation", "test"):
        if _frame(splits[name]).empty:
            raise _empty(sources, name)


def _empty(sources: dict[str, str], name: str) -> DataError:
    """The error of an empty validation or test split."""
    return DataError(
        f"{sources[name]}: {name} split is empty; give data.{name}_uri or raise data.split.{name}"
    )


def _targets(frame: pd.DataFrame) -> dict[str, float]:
    """Rows and summary of one split's targets."""
    values = frame["label"].to_numpy(dtype=np.float64)
    return {
        "rows": float(len(values)),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": round(float(values.mean()), 6),
        "std": round(float(values.std()), 6),
    }


def _members(label: str | tuple[str, ...]) -> tuple[str, ...]:
    """The labels of one row's cell: the set itself, or its one label."""
    return label if isinstance(label, tuple) else (label,)


def _keys(rows: Rows) -> pd.Series:
    """What identifies a row's input: its text, or a hash of an image's pixels."""
    if isinstance(rows, ImageRows):
        return pd.Series(
            [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in rows.images]
        )
    if "text_pair" in rows.columns:  # a pair is its two texts, in order
        return rows["text"] + "\t" + rows["text_pair"]
    return rows["text"]


def _fingerprint(keys: dict[str, pd.Series], splits: dict[str, Rows], label_map: LabelMap) -> str:
    """Content hash of the canonical rows: identical data gives identical fingerprints."""
    digest = hashlib.sha256()
    digest.update(label_map.model_dump_json().encode())
    for name in SPLITS:
        rows = splits[name]
        if isinstance(rows, ImageRows):
            digest.update(f"\0image {rows.images.shape}".encode())
        digest.update(f"\0{name}\0{len(rows)}\0".encode())
        for key, label in zip(keys[name], _frame(rows)["label"], strict=True):
            digest.update(f"{label}\t{key}\n".encode())
    return digest.hexdigest()


def _image_stats(images: np.ndarray) -> ImageStats:
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return ImageStats(
        height=int(images.shape[1]),
        width=int(images.shape[2]),
        channels=int(images.shape[3]),
        mean=[round(float(v), 5) for v in pixels.mean(axis=0)],
        std=[round(float(v), 5) for v in pixels.std(axis=0)],
    )


def _encoded(frame: pd.DataFrame, label_map: LabelMap) -> pd.DataFrame:
    """The frame with its labels as ids: an int32 per row, or for label sets a sorted list
    of ids per row (stored as a Parquet list column)."""
    labels = frame["label"]
    if labels.dtype.kind == "f":  # scores (regression) are stored as they are
        return frame
    if len(labels) and isinstance(labels.iloc[0], tuple):
        index = {value: i for i, value in enumerate(label_map.values)}
        ids = [sorted(index[v] for v in members) for members in labels.tolist()]
        return frame.assign(label=pd.Series(ids, index=frame.index, dtype=object))
    return frame.assign(label=label_map.encode(labels).astype("int32"))


def _label_counts(frame: pd.DataFrame, label_map: LabelMap) -> np.ndarray:
    """Rows carrying each label (a row of a set counts once for each of its labels)."""
    labels = frame["label"].to_numpy()
    if len(labels) and isinstance(labels[0], list):
        labels = np.fromiter((i for ids in labels for i in ids), dtype=np.int64)
    return np.bincount(labels.astype(np.int64), minlength=len(label_map))


def data_stamp(config: PipelineConfig) -> str:
    """Content stamp of every data source (S3: ETags and sizes of the objects under each URI;
    local: sha256), in config order: changes whenever data behind the URIs changes."""
    data = config.data
    uris = [u for u in (data.uri, data.train_uri, data.validation_uri, data.test_uri) if u]
    return ",".join(storage.stamp(u, config.storage) for u in uris)


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
    stamp = data_stamp(config)  # before reading: a change while reading reads as new data
    with tempfile.TemporaryDirectory(prefix="transferkit-ingest-") as scratch:
        raw_splits, sources = _split(config, Path(scratch))
    _check(raw_splits, sources, config)
    regression = config.task == "regression"
    if regression:  # one output, the score
        label_map = LabelMap(values=[SCORE], names=[SCORE])
    else:
        label_map = LabelMap.from_values(
            _label_values(_frame(raw_splits["train"])["label"]), config.data.label_names
        )
    frames = {name: _encoded(_frame(rows), label_map) for name, rows in raw_splits.items()}
    keys = {name: _keys(rows) for name, rows in raw_splits.items()}
    what = NOUNS[config.data.modality]

    train_keys = keys["train"]
    duplicated = train_keys.duplicated(keep=False).to_numpy()
    train_labels = _frame(raw_splits["train"])["label"].to_numpy()
    conflicting = int(
        pd.DataFrame({"key": train_keys[duplicated], "label": train_labels[duplicated]})
        .groupby("key")["label"]
        .nunique()
        .gt(1)
        .sum()
    )
    train_set = set(train_keys)
    overlap = {name: int(keys[name].isin(train_set).sum()) for name in ("validation", "test")}
    if overlap["test"]:
        log.warning(
            "%d evaluation %s also occur in training; the evaluation may be optimistic",
            overlap["test"],
            what,
        )
    if conflicting:
        log.warning("%d training %s occur with different labels", conflicting, what)

    fingerprint = _fingerprint(keys, raw_splits, label_map)
    train_rows = raw_splits["train"]
    result = IngestResult(
        modality=config.data.modality,
        task=config.task,
        pairs=config.data.text_pair_column is not None,
        targets={name: _targets(frame) for name, frame in frames.items()} if regression else None,
        image=_image_stats(train_rows.images) if isinstance(train_rows, ImageRows) else None,
        fingerprint=fingerprint,
        rows={name: len(frame) for name, frame in frames.items()},
        labels=label_map.names,
        class_balance={}
        if regression
        else {
            name: {
                label_map.names[i]: int(c) for i, c in enumerate(_label_counts(frame, label_map))
            }
            for name, frame in frames.items()
        },
        duplicate_texts=int(train_keys.duplicated().sum()),
        conflicting_duplicates=conflicting,
        overlap=overlap,
        sources=sources,
        source_stamp=stamp,
        seconds=round(time.perf_counter() - started, 3),
    )
    with storage.atomic_dir(output_dir) as tmp:
        for name, frame in frames.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
            rows = raw_splits[name]
            if isinstance(rows, ImageRows):
                np.save(tmp / f"{name}_images.npy", rows.images)
        storage.write_json(tmp / "label_map.json", label_map.model_dump())
        storage.write_json(tmp / "stats.json", result.model_dump())
    log.info(
        "ingested %s: %s",
        fingerprint[:12],
        ", ".join(f"{k} {v:,}" for k, v in result.rows.items()),
    )
    return result
