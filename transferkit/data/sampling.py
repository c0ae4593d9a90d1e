"""Reproducible label-stratified samples of rows, for every task's labels."""

from __future__ import annotations

import numpy as np

from transferkit.errors import TrainingError


def sample_per_class(
    labels: np.ndarray, k: int, seed: int, names: list[str], strict: bool = True
) -> np.ndarray:
    """Indices of k examples of every label, drawn with ``seed``, in a fixed order.

    Args:
        strict: a label with fewer than k examples is an error; otherwise all of them are
            taken (a label budget larger than a rare class).

    Raises:
        TrainingError: ``strict`` and a label has fewer than k examples.
    """
    if strict:
        require_examples(np.bincount(labels, minlength=len(names)), k, names)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(names)):
        pool = np.flatnonzero(labels == label)
        if not strict and len(pool) <= k:
            chosen.append(pool)
            continue
        chosen.append(np.sort(rng.choice(pool, size=k, replace=False)))
    return np.concatenate(chosen)


def require_examples(counts: np.ndarray, k: int, names: list[str]) -> None:
    """few_shot's k: every label must have k training examples (``counts`` per label).

    Raises:
        TrainingError: naming up to five labels that have fewer, and the fix.
    """
    short = [(names[j], int(n)) for j, n in enumerate(counts) if n < k]
    if short:
        named = ", ".join(f"'{name}' has {n}" for name, n in short[:5])
        raise TrainingError(
            f"few_shot needs {k} training examples of every label; {named}"
            f"{' …' if len(short) > 5 else ''} — lower training.examples_per_class"
        )


# Rows per quantile bin of the targets when a regression split is stratified, and most bins.
ROWS_PER_BIN = 20
MAX_BINS = 10


def quantile_bins(scores: np.ndarray) -> np.ndarray:
    """Each score's quantile bin (up to MAX_BINS bins of about ROWS_PER_BIN rows or more):
    a split stratified on them keeps the targets' distribution in every split."""
    bins = min(MAX_BINS, len(scores) // ROWS_PER_BIN)
    if bins < 2:
        return np.zeros(len(scores), dtype=np.int64)
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, scores, side="right")


def strata(truth: np.ndarray) -> np.ndarray:
    """What a stratified division of rows keeps in proportion, one value per row: its class
    id; for label sets [rows, labels] the id of its rarest label (-1 for an empty set), so
    every label keeps about its share in each part; for scores their quantile bin."""
    truth = np.asarray(truth)
    if truth.ndim == 2:
        counts = truth.sum(axis=0)
        rarest = np.where(truth, counts, np.iinfo(np.int64).max).argmin(axis=1)
        return np.where(truth.any(axis=1), rarest, -1)
    if truth.dtype.kind == "f":
        return quantile_bins(truth)
    return truth


# Quantile bins of a score that a sample of scores is stratified on (deciles).
SCORE_BINS = 10


def sample_rows(truth: np.ndarray, k: int, seed: int, names: list[str]) -> np.ndarray:
    """Indices of up to k examples of every label, drawn with ``seed``, for any task.

    Class ids [rows]: k of every class (all of a rarer one). Label sets [rows, labels]
    (boolean): rows drawn for the rarest label first, then the next, until every label is
    carried by k drawn rows (a row counts for each label it carries; a rarer label gives all
    its rows). Scores [rows] (float): k from each decile of the target.
    """
    truth = np.asarray(truth)
    if truth.ndim == 2:
        return _sample_sets(truth, k, seed)
    if truth.dtype.kind == "f":
        edges = np.unique(np.quantile(truth, np.linspace(0, 1, SCORE_BINS + 1)[1:-1]))
        bins = np.searchsorted(edges, truth, side="right")
        return sample_per_class(bins, k, seed, [str(b) for b in range(len(edges) + 1)], False)
    return sample_per_class(truth, k, seed, names, strict=False)


def _sample_sets(sets: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(sets), dtype=bool)
    for label in np.argsort(sets.sum(axis=0), kind="stable"):
        missing = k - int(sets[chosen, label].sum())
        if missing <= 0:
            continue
        pool = np.flatnonzero(sets[:, label] & ~chosen)
        chosen[pool if len(pool) <= missing else rng.choice(pool, missing, replace=False)] = True
    return np.flatnonzero(chosen)
