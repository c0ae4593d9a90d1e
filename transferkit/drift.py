"""Embedding drift: a two-sample statistic between the champion's training inputs and recent
inputs, both embedded by the champion's encoder.

Registration stores a seeded sample of the training split's embeddings with the model run
(``drift/reference.npy``); ``transferkit trigger`` embeds recent inputs the same way and
compares the two samples with the squared maximum mean discrepancy (MMD², unbiased, Gaussian
kernel with the median-distance bandwidth; Gretton et al. 2012), and a permutation p-value.
MMD² is 0 in expectation for one distribution and grows with the shift, so its threshold is
an effect size, not a significance level that any large sample would cross.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit import storage
from transferkit.config import DriftConfig, StorageConfig
from transferkit.data.dataset import TextPairs
from transferkit.data.readers import read_text_pairs
from transferkit.errors import DataError, StorageError

REFERENCE_ROWS = 1000
REFERENCE_PATH = "drift/reference.npy"


@dataclass(frozen=True)
class DriftResult:
    """MMD² between the reference and recent embeddings, and its permutation p-value."""

    mmd2: float
    p_value: float
    reference_rows: int
    recent_rows: int


def sample_rows(count: int, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded sample of at most ``limit`` of ``count`` rows."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def _kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = np.vstack([x, y]).astype(np.float64)
    squared = (z**2).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * z @ z.T, 0.0)
    upper = distances[np.triu_indices(len(z), 1)]
    median = float(np.median(upper)) if upper.size else 0.0
    return np.exp(-distances / median) if median > 0 else np.ones_like(distances)


def _mmd2(kernel: np.ndarray, first: np.ndarray) -> float:
    """Unbiased MMD² of the split ``first`` (a boolean mask) against the rest."""
    x, y = kernel[np.ix_(first, first)], kernel[np.ix_(~first, ~first)]
    n, m = len(x), len(y)
    within = (x.sum() - np.trace(x)) / (n * (n - 1)) + (y.sum() - np.trace(y)) / (m * (m - 1))
    return float(within - 2 * kernel[np.ix_(first, ~first)].mean())


def mmd_test(
    reference: np.ndarray, recent: np.ndarray, permutations: int = 200, seed: int = 0
) -> DriftResult:
    """MMD² of two samples [rows, features] and the permutation p-value of 'no drift'.

    Raises:
        ValueError: fewer than two rows in a sample, or different widths.
    """
    if len(reference) < 2 or len(recent) < 2:
        raise ValueError("each sample needs at least two rows")
    if reference.shape[1] != recent.shape[1]:
        raise ValueError(f"embedding widths differ: {reference.shape[1]} vs {recent.shape[1]}")
    kernel = _kernel(reference, recent)
    mask = np.zeros(len(kernel), dtype=bool)
    mask[: len(reference)] = True
    observed = _mmd2(kernel, mask)
    rng = np.random.default_rng(seed)
    exceed = sum(_mmd2(kernel, rng.permutation(mask)) >= observed for _ in range(permutations))
    return DriftResult(
        mmd2=observed,
        p_value=(exceed + 1) / (permutations + 1),
        reference_rows=len(reference),
        recent_rows=len(recent),
    )


def read_recent(
    drift: DriftConfig, modality: Any, storage_config: StorageConfig, pairs: bool = False
) -> list[str] | TextPairs | np.ndarray:
    """The recent inputs of ``drift.uri``, a seeded sample of at most ``drift.max_rows``:
    texts, text pairs (``pairs``: a model of pairs; columns text_column and
    text_pair_column of a table), or uint8 images [N, H, W(, C)].

    Raises:
        DataError: unreadable, of the wrong kind for the model, or fewer than 20 inputs.
        StorageError: the URI cannot be read.
    """
    uri = drift.uri
    with tempfile.TemporaryDirectory(prefix="transferkit-drift-") as scratch:
        try:
            path = storage.fetch_file(uri, Path(scratch), storage_config)
        except StorageError as exc:
            raise StorageError(f"trigger.drift.uri: {exc}") from None
        if pairs:
            if drift.text_pair_column is None:
                raise DataError(
                    "trigger.drift: the champion reads text pairs; set data.text_pair_column "
                    "(or trigger.drift.text_pair_column) to the recent table's second text"
                )
            inputs = read_text_pairs(
                path,
                f"trigger.drift.uri {uri}",
                drift.text_column,
                drift.text_pair_column,
                "trigger.drift.text_column and trigger.drift.text_pair_column",
            )
        else:
            inputs = modality.read_unlabelled(path, uri, drift.text_column)
        if inputs is None:
            raise DataError(
                f"trigger.drift.uri {uri}: the champion takes {modality.unlabelled_form}; point "
                "it there"
            )
    if len(inputs) < 20:
        raise DataError(
            f"trigger.drift.uri {uri}: {len(inputs)} inputs; a drift test needs at least 20"
        )
    return modality.subset(inputs, sample_rows(len(inputs), drift.max_rows))
