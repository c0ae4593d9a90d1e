"""Stratified k-fold cross-validation folds over the training and validation splits pooled.

A validation split of a few dozen rows cannot tell strategies apart (one image moves a
78-image AUC by about 0.01). Cross-validation scores every pooled row once, each by a model
that never saw it. ``fold_datasets`` writes one dataset artifact per fold in the layout
ingest_data writes, so each strategy trains on a fold exactly as it trains on the real splits:

    train       the other folds, less an early-stopping share
    validation  that share (the validation split's fraction of the pooled rows, per label):
                early stopping and the probe's L2 choice see only these rows
    test        the fold itself: scored once, after training, and nothing else

The evaluation split of the run is never read. Features of the pooled rows are sliced from
the extract_features artifact, so the frozen backbone is not run again.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from transferkit import storage
from transferkit.data import LabelMap, load_label_map, load_labels
from transferkit.data.sampling import strata
from transferkit.errors import DataError

POOLED = ("train", "validation")


@dataclass(frozen=True)
class Fold:
    """One fold's rows (indices into the pooled train + validation rows) and its folders."""

    index: int
    train: np.ndarray
    stop: np.ndarray
    held_out: np.ndarray
    dataset_dir: Path
    features_dir: Path


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of every row: each stratum's rows (``strata``: a label, a set's rarest
    label, a score's quantile bin) shuffled with ``seed`` and dealt in turn, continuing the
    deal across strata so fold sizes differ by at most one."""
    labels = strata(labels)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        assignment[rows] = (dealt + np.arange(len(rows))) % folds
        dealt += len(rows)
    return assignment


def stopping_share(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of ``rows`` (at least one row of every stratum with two or
    more), for early stopping."""
    labels = strata(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[rows]):
        mine = rows[labels[rows] == label]
        take = min(max(1, round(fraction * len(mine))), len(mine) - 1)
        chosen.append(rng.permutation(mine)[:take])
    return np.sort(np.concatenate(chosen)) if chosen else rows[:0]


def check_folds(labels: np.ndarray, label_map: LabelMap, folds: int) -> None:
    """Every label needs a row in every fold (label sets: a carrier; scores: ``folds`` rows
    twice over, so each fold trains, stops early and is scored).

    Raises:
        DataError: a label has fewer pooled rows than folds, naming it and the fix.
    """
    if np.ndim(labels) == 1 and labels.dtype.kind == "f":
        if len(labels) < 2 * folds:
            raise DataError(
                f"training.cross_validation_folds: {folds} folds need {2 * folds} scored rows "
                f"in the training and validation splits, there are {len(labels)}; lower the "
                "folds or unset them"
            )
        return
    counts = (
        labels.sum(axis=0)
        if np.ndim(labels) == 2
        else np.bincount(labels, minlength=len(label_map))
    )
    short = [(label_map.names[i], int(n)) for i, n in enumerate(counts) if n < folds]
    if short:
        name, n = short[0]
        raise DataError(
            f"training.cross_validation_folds: {folds} folds need {folds} rows of every label "
            f"in the training and validation splits, '{name}' has {n}; lower the folds or "
            "unset them"
        )


def _write_split(
    frame: pd.DataFrame, images: np.ndarray | None, rows: np.ndarray, split: str, out: Path
) -> None:
    frame.iloc[rows].reset_index(drop=True).to_parquet(out / f"{split}.parquet", index=False)
    if images is not None:
        np.save(out / f"{split}_images.npy", images[rows])


def fold_datasets(
    dataset_dir: Path, features_dir: Path, folds: int, seed: int, scratch: Path
) -> Iterator[Fold]:
    """Write each fold's dataset and features artifacts under ``scratch`` and yield them in
    turn (the previous fold's folders are removed first, so one fold is on disk at a time).

    Raises:
        DataError: a label has fewer pooled rows than ``folds``.
    """
    label_map = load_label_map(dataset_dir)
    frame = pd.concat(
        [pd.read_parquet(dataset_dir / f"{split}.parquet") for split in POOLED], ignore_index=True
    )
    parts = [load_labels(dataset_dir, split) for split in POOLED]
    labels = np.concatenate(parts)
    check_folds(labels, label_map, folds)
    # Image datasets keep their pixels beside the table: sliced by fold like the rows.
    arrays = [dataset_dir / f"{s}_images.npy" for s in POOLED]
    images = np.concatenate([np.load(a) for a in arrays]) if arrays[0].exists() else None
    features = np.concatenate([np.load(features_dir / f"{split}.npy") for split in POOLED])
    fraction = len(parts[1]) / len(labels)  # the validation split's share
    assignment = assign_folds(labels, folds, seed)
    stats = storage.read_json(dataset_dir / "stats.json")
    for index in range(folds):
        held_out = np.flatnonzero(assignment == index)
        rest = np.flatnonzero(assignment != index)
        stop = stopping_share(labels, rest, fraction, seed + index)
        train = np.setdiff1d(rest, stop)
        here = scratch / f"fold-{index}"
        shutil.rmtree(scratch / f"fold-{index - 1}", ignore_errors=True)
        data_dir, feature_dir = here / "dataset", here / "features"
        data_dir.mkdir(parents=True)
        feature_dir.mkdir()
        for split, rows in (("train", train), ("validation", stop), ("test", held_out)):
            _write_split(frame, images, rows, split, data_dir)
            np.save(feature_dir / f"{split}.npy", features[rows])
        shutil.copyfile(dataset_dir / "label_map.json", data_dir / "label_map.json")
        # A fold is other data: its own fingerprint keeps every cache keyed by content apart.
        tag = f"{stats['fingerprint']}:cross-validation:{folds}:{index}:{seed}"
        fingerprint = hashlib.sha256(tag.encode()).hexdigest()
        storage.write_json(data_dir / "stats.json", {**stats, "fingerprint": fingerprint})
        yield Fold(index, train, stop, held_out, data_dir, feature_dir)
