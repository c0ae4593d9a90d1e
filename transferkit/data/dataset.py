"""The dataset artifact written by ingest_data, and how later steps read it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from transferkit.errors import DataError

SPLITS = ("train", "validation", "test")
# The one output of a regression model (task: regression), where a classifier names labels.
SCORE = "score"


@dataclass(frozen=True)
class TextPairs:
    """The inputs of a text-pair dataset (data.text_pair_column): two texts per row."""

    first: list[str]
    second: list[str]

    def __len__(self) -> int:
        return len(self.first)

    def take(self, rows: Iterable[int]) -> TextPairs:
        """The pairs of ``rows``, in that order."""
        index = list(rows)
        return TextPairs([self.first[i] for i in index], [self.second[i] for i in index])

    def joined(self) -> list[tuple[str, str]]:
        """Each row's two texts as one input of a cross-encoder (tokenised together)."""
        return list(zip(self.first, self.second, strict=True))


class LabelMap(BaseModel):
    """Label ids ↔ raw values in the data ↔ display names returned by predictions."""

    values: list[str]
    names: list[str]

    @classmethod
    def from_values(cls, values: Iterable[str], label_names: dict[str, str] | None) -> LabelMap:
        """Sort labels (numerically when every value is an integer) and attach display names.

        Raises:
            DataError: ``label_names`` names a value absent from the data, or two labels
                would share a display name.
        """
        unique = sorted(set(values))
        with contextlib.suppress(ValueError):  # not all integers: keep text order
            unique = sorted(unique, key=int)
        names_by_value = label_names or {}
        stray = sorted(set(names_by_value) - set(unique))
        if stray:
            raise DataError(
                f"data.label_names names {', '.join(map(repr, stray))}, not a label of the "
                f"training data (labels: {', '.join(unique[:10])}); fix its keys"
            )
        names = [names_by_value.get(value, value) for value in unique]
        if len(set(names)) != len(names):
            raise DataError("data.label_names gives two labels the same name; make names unique")
        return cls(values=unique, names=names)

    def encode(self, raw: pd.Series) -> np.ndarray:
        """Raw label values → integer ids."""
        index = {value: i for i, value in enumerate(self.values)}
        return raw.map(index).to_numpy()

    def __len__(self) -> int:
        return len(self.values)

    def positive(self, label: str | None) -> int | None:
        """Index of the positive label of a binary task (``evaluation.positive_label``).

        Raises:
            DataError: ``label`` is neither a display name nor a raw value.
        """
        if label is None or len(self.names) != 2:
            return None
        for candidates in (self.names, self.values):
            if label in candidates:
                return candidates.index(label)
        raise DataError(
            f"evaluation.positive_label {label!r} is not a label (labels: "
            f"{', '.join(self.names)}); use one of them"
        )


def load_label_map(dataset_dir: Path) -> LabelMap:
    """The label map of a dataset artifact."""
    return LabelMap.model_validate_json((dataset_dir / "label_map.json").read_text())


def has_pairs(dataset_dir: Path) -> bool:
    """Whether a dataset artifact's rows hold two texts (data.text_pair_column), as its
    stats.json records."""
    stats = dataset_dir / "stats.json"
    return stats.exists() and bool(json.loads(stats.read_text()).get("pairs"))


def load_split(dataset_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Texts and integer label ids of one split of a dataset artifact (label sets: a boolean
    matrix [rows, labels]; scores: float64 [rows]).

    Raises:
        DataError: the rows are text pairs (read them with ``load_text_inputs``).
    """
    texts, labels = load_text_inputs(dataset_dir, split)
    if isinstance(texts, TextPairs):
        raise DataError(f"{dataset_dir}: rows of text pairs; read them with load_text_inputs")
    return texts, labels


def load_text_inputs(dataset_dir: Path, split: str) -> tuple[list[str] | TextPairs, np.ndarray]:
    """The texts of one split (a pair dataset's: ``TextPairs``) and their labels."""
    frame = pd.read_parquet(dataset_dir / f"{split}.parquet")
    labels = _labels(frame["label"], dataset_dir)
    if "text_pair" in frame.columns:
        return TextPairs(frame["text"].tolist(), frame["text_pair"].tolist()), labels
    return frame["text"].tolist(), labels


def load_labels(dataset_dir: Path, split: str) -> np.ndarray:
    """Integer label ids of one split (text or images); label sets as a boolean matrix."""
    frame = pd.read_parquet(dataset_dir / f"{split}.parquet", columns=["label"])
    return _labels(frame["label"], dataset_dir)


def _labels(column: pd.Series, dataset_dir: Path) -> np.ndarray:
    """A split's labels: int64 ids [rows], or for label sets (task: multi_label) a boolean
    matrix [rows, labels] (row i, column j: row i carries label j), or for scores (task:
    regression) float64 [rows]."""
    if column.dtype.kind == "f":
        return column.to_numpy(dtype=np.float64)
    if column.dtype != object:
        return column.to_numpy(dtype=np.int64)
    return label_sets(column.tolist(), len(load_label_map(dataset_dir)))


def label_sets(ids: Iterable[Any], labels: int) -> np.ndarray:
    """Each row's list of label ids as a boolean matrix [rows, labels]."""
    rows = list(ids)
    sets = np.zeros((len(rows), labels), dtype=bool)
    for row, chosen in enumerate(rows):
        sets[row, np.asarray(chosen, dtype=np.int64)] = True
    return sets


def load_label_sets(dataset_dir: Path, split: str) -> np.ndarray:
    """The label sets of one split of a ``task: multi_label`` dataset as a boolean matrix
    [rows, labels] (row i, column j: row i carries label j).

    Raises:
        DataError: the dataset has one label per row.
    """
    sets = load_labels(dataset_dir, split)
    if sets.ndim != 2:
        raise DataError(f"{dataset_dir}: one label per row, not label sets (task: classification)")
    return sets


def load_images(dataset_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W, C] and integer label ids of one split of an image dataset.

    Raises:
        DataError: the dataset holds text, not images.
    """
    path = dataset_dir / f"{split}_images.npy"
    if not path.exists():
        raise DataError(f"{dataset_dir}: a text dataset, not images; use a vision strategy path")
    return np.load(path), load_labels(dataset_dir, split)
