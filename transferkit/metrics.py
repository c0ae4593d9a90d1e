"""Classification metrics from labels and predictions, and paired tests between two models."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel


class ClassScores(BaseModel):
    """Per-class precision, recall, F1 and support."""

    precision: float
    recall: float
    f1: float
    support: int


class Scores(BaseModel):
    """Headline metrics, per-class scores and the confusion matrix (rows: true labels)."""

    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]]
    labels: list[str]
    rows: int

    def metric(self, name: str) -> float:
        """A headline metric by its config name (``evaluation.primary_metric``)."""
        return float(getattr(self, name))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Confusion counts [true, predicted]."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def score(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> Scores:
    """Accuracy, macro-F1 and per-class scores of integer predictions.

    Classes absent from both truth and predictions get zero scores and still count in the
    macro average, as in scikit-learn's ``f1_score(average='macro', labels=all)``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    matrix = confusion(y_true, y_pred, len(labels))
    tp = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    actual = matrix.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0
    )
    return Scores(
        accuracy=float(tp.sum() / max(len(y_true), 1)),
        macro_f1=float(f1.mean()),
        per_class={
            name: ClassScores(
                precision=float(precision[i]),
                recall=float(recall[i]),
                f1=float(f1[i]),
                support=int(actual[i]),
            )
            for i, name in enumerate(labels)
        },
        confusion_matrix=matrix.tolist(),
        labels=list(labels),
        rows=len(y_true),
    )


class PairedComparison(BaseModel):
    """A challenger and a champion scored on the same evaluation rows, with a paired test.

    ``p_value`` is one-sided (H1: the challenger is better); the interval is two-sided at
    ``ci_level`` = 1 − 2α, so its lower bound is above zero exactly when the test passes.
    """

    method: str
    metric: str
    rows: int
    challenger: float
    champion: float
    gain: float
    p_value: float
    ci_low: float
    ci_high: float
    ci_level: float
    challenger_only_right: int
    champion_only_right: int


def mcnemar_p(challenger_only: int, champion_only: int) -> float:
    """Exact one-sided McNemar p-value: P(X ≥ challenger_only), X ~ Binomial(b + c, 1/2)."""
    n = challenger_only + champion_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(challenger_only, n + 1))
    return float(tail / 2**n)


def _metric_value(
    truth: np.ndarray,
    predicted: np.ndarray,
    labels: list[str],
    metric: str,
) -> float:
    return score(truth, predicted, labels).metric(metric)


def paired_comparison(
    truth: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    labels: list[str],
    metric: str,
    method: str,
    alpha: float,
    samples: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """Compare two classifiers' predictions on the same rows.

    Args:
        truth: true label ids.
        challenger: the new model's predicted ids.
        champion: the current champion's predicted ids on the same rows.
        labels: label names (for macro-F1).
        metric: 'accuracy' or 'macro_f1'.
        method: 'mcnemar' (exact test on the discordant rows, Wald interval on the accuracy
            difference) or 'bootstrap' (paired resampling of rows, percentile interval and
            one-sided p on the metric difference).
        alpha: one-sided significance level.
        samples: bootstrap resamples.
        seed: bootstrap seed (the result is reproducible).
    """
    from statistics import NormalDist

    truth = np.asarray(truth)
    right_new = np.asarray(challenger) == truth
    right_old = np.asarray(champion) == truth
    only_new = int((right_new & ~right_old).sum())
    only_old = int((right_old & ~right_new).sum())
    rows = len(truth)
    new_value = _metric_value(truth, challenger, labels, metric)
    old_value = _metric_value(truth, champion, labels, metric)
    level = 1 - 2 * alpha
    if method == "mcnemar":
        diff = (only_new - only_old) / rows
        spread = math.sqrt(max(only_new + only_old - (only_new - only_old) ** 2 / rows, 0)) / rows
        z = NormalDist().inv_cdf(1 - alpha)
        p_value, low, high = mcnemar_p(only_new, only_old), diff - z * spread, diff + z * spread
    else:
        rng = np.random.default_rng(seed)
        gains = np.empty(samples)
        for i in range(samples):
            index = rng.integers(0, rows, rows)
            gains[i] = _metric_value(
                truth[index], challenger[index], labels, metric
            ) - _metric_value(truth[index], champion[index], labels, metric)
        p_value = float((gains <= 0).mean())
        low, high = (float(q) for q in np.quantile(gains, [alpha, 1 - alpha]))
    return PairedComparison(
        method=method,
        metric=metric,
        rows=rows,
        challenger=new_value,
        champion=old_value,
        gain=new_value - old_value,
        p_value=p_value,
        ci_low=low,
        ci_high=high,
        ci_level=level,
        challenger_only_right=only_new,
        champion_only_right=only_old,
    )
