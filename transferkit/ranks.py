"""Ranking measures of scores against a boolean truth, shared by every task's metrics."""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` in ascending order, tied values sharing their mean rank
    (``scipy.stats.rankdata``'s "average" method).

    Args:
        values: one value per row (1-D).

    Returns:
        float64 ranks, one per row, in the rows' order.

    Raises:
        ValueError: ``values`` is not one-dimensional.
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(
            f"average_ranks got an array of shape {values.shape}; pass one value per row (1-D)"
        )
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    # A run of ties at sorted positions start..end-1 holds ranks start+1..end: their mean.
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (the Mann–Whitney U statistic, ties counted half).

    Args:
        positive: boolean truth, True for the positive class.
        scores: higher means more likely positive.

    Returns:
        The AUC; 0.5 when only one class is present (no ranking to judge).
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as a step function (scikit-learn's
    ``average_precision_score``): the precision at each positive's rank, averaged; tied
    scores count as one cut. 0 when no row is positive."""
    positive = np.asarray(positive, dtype=bool)
    total = int(positive.sum())
    if total == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    ordered = np.asarray(scores, dtype=np.float64)[order]
    hits = positive[order]
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    tp = np.cumsum(hits)[ends].astype(np.float64)
    precision = tp / (ends + 1)
    recall_gain = np.diff(np.r_[0.0, tp]) / total
    return float((precision * recall_gain).sum())
