"""Multi-label (``task: multi_label``) scores and decision thresholds.

Each row carries a set of labels, held as a boolean matrix [rows, labels]; a model gives one
independent probability per label (a sigmoid per logit) and a threshold per label turns them
into a set. The metrics are the usual ones of multi-label tagging (GoEmotions, the
scikit-learn averages): F1 micro-averaged over every (row, label) decision, macro-averaged over
labels, and averaged over rows ('samples'); subset accuracy (the whole set right), Hamming
loss (the share of wrong decisions), and two threshold-free ones, per-label ROC-AUC and
average precision (macro means).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel

from transferkit.ranks import average_precision, roc_auc

# evaluation.primary_metric values that judge a multi-label model, higher better.
METRICS = (
    "macro_f1",
    "micro_f1",
    "samples_f1",
    "subset_accuracy",
    "mean_average_precision",
    "roc_auc",
)
# The ones computed from decisions (the thresholds move them); the rest rank probabilities.
THRESHOLDED = ("macro_f1", "micro_f1", "samples_f1", "subset_accuracy")


class LabelScores(BaseModel):
    """One label's decisions (precision, recall, F1 at its threshold) and ranking (AUC,
    average precision), and how many rows carry it."""

    precision: float
    recall: float
    f1: float
    roc_auc: float
    average_precision: float
    support: int


class MultiLabelScores(BaseModel):
    """Headline metrics and per-label scores of a multi-label model on one split."""

    macro_f1: float
    micro_f1: float
    samples_f1: float
    subset_accuracy: float
    hamming_loss: float
    mean_average_precision: float
    roc_auc: float
    per_label: dict[str, LabelScores]
    labels: list[str]
    rows: int

    def metric(self, name: str) -> float:
        """A headline metric by its config name (``evaluation.primary_metric``)."""
        if name not in METRICS:
            raise ValueError(f"{name} is not a multi-label metric; use one of {', '.join(METRICS)}")
        return float(getattr(self, name))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, stable for large logits of either sign."""
    z = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.divide(
        2 * tp, denominator, out=np.zeros_like(denominator, dtype=float), where=denominator > 0
    )


def score_sets(
    truth: np.ndarray, predicted: np.ndarray, proba: np.ndarray, labels: list[str]
) -> MultiLabelScores:
    """Scores of predicted label sets (and the probabilities behind them) against the truth.

    Args:
        truth: boolean [rows, labels].
        predicted: boolean [rows, labels], the decisions.
        proba: [rows, labels], each label's probability.
        labels: label names, in column order.

    A label no row carries and none is predicted has F1 0 and counts in the macro mean, as
    in scikit-learn with ``zero_division=0``; a row with an empty true and predicted set has
    samples-F1 1 (nothing to find, nothing wrongly claimed).
    """
    truth = np.asarray(truth, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    tp = (truth & predicted).sum(axis=0).astype(float)
    fp = (~truth & predicted).sum(axis=0).astype(float)
    fn = (truth & ~predicted).sum(axis=0).astype(float)
    f1 = _f1(tp, fp, fn)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    row_tp = (truth & predicted).sum(axis=1).astype(float)
    row_den = truth.sum(axis=1) + predicted.sum(axis=1)
    samples = np.where(row_den > 0, np.divide(2 * row_tp, np.maximum(row_den, 1)), 1.0)
    aucs = [roc_auc(truth[:, j], proba[:, j]) for j in range(truth.shape[1])]
    aps = [average_precision(truth[:, j], proba[:, j]) for j in range(truth.shape[1])]
    per_label = {
        name: LabelScores(
            precision=float(precision[j]),
            recall=float(recall[j]),
            f1=float(f1[j]),
            roc_auc=float(aucs[j]),
            average_precision=float(aps[j]),
            support=int(truth[:, j].sum()),
        )
        for j, name in enumerate(labels)
    }
    rows = len(truth)
    return MultiLabelScores(
        macro_f1=float(f1.mean()) if len(f1) else 0.0,
        micro_f1=float(_f1(tp.sum(), fp.sum(), fn.sum())),
        samples_f1=float(samples.mean()) if rows else 0.0,
        subset_accuracy=float((truth == predicted).all(axis=1).mean()) if rows else 0.0,
        hamming_loss=float((truth != predicted).mean()) if truth.size else 0.0,
        mean_average_precision=float(np.mean(aps)) if aps else 0.0,
        roc_auc=float(np.mean(aucs)) if aucs else 0.5,
        per_label=per_label,
        labels=list(labels),
        rows=rows,
    )


def _best_cut(positive: np.ndarray, p: np.ndarray) -> float:
    """The threshold on one label's probabilities that maximises its F1 (ties: nearest 0.5),
    midway between the probabilities it separates; 0.5 when no row carries the label."""
    if not positive.any():
        return 0.5
    order = np.argsort(-p, kind="stable")
    ordered, hits = p[order], positive[order]
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    tp = np.cumsum(hits)[ends].astype(float)
    fp = (ends + 1) - tp
    fn = positive.sum() - tp
    values = _f1(tp, fp, fn)
    below = np.r_[ordered[ends[:-1] + 1], 0.0]
    cuts = (ordered[ends] + below) / 2
    best = np.flatnonzero(values >= values.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def tune_thresholds(
    truth: np.ndarray,
    proba: np.ndarray,
    mode: Literal["per_label", "global"],
    metric: str,
) -> np.ndarray:
    """Decision thresholds chosen on (validation) rows: one per label maximising that
    label's F1, or one for every label maximising ``metric`` (a thresholded metric; the
    threshold-free ones take 0.5).

    Returns:
        float64 [labels].
    """
    truth = np.asarray(truth, dtype=bool)
    proba = np.asarray(proba, dtype=np.float64)
    labels = truth.shape[1]
    if mode == "per_label":
        return np.array([_best_cut(truth[:, j], proba[:, j]) for j in range(labels)])
    if metric not in THRESHOLDED:
        return np.full(labels, 0.5)
    grid = np.linspace(0.05, 0.95, 19)
    values = [set_metric(truth, proba >= cut, proba, metric) for cut in grid]  # coarse: 19 cuts
    best = np.flatnonzero(np.asarray(values) >= max(values) - 1e-12)
    return np.full(labels, float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]]))


def metric_of_set_logits(
    truth: np.ndarray, logits: np.ndarray, labels: list[str], metric: str
) -> float:
    """One headline metric of multi-label logits, each label decided at its F1-best
    threshold on these same rows (selection during training: which penalty or checkpoint
    is best once its thresholds are tuned, as they will be). ``labels`` is unused: the
    signature is ``metric_of_logits``'s, so the probe calls either."""
    proba = sigmoid(logits)
    cuts = tune_thresholds(truth, proba, "per_label", metric)
    return set_metric(truth, proba >= cuts, proba, metric)


def set_metric(truth: np.ndarray, predicted: np.ndarray, proba: np.ndarray, metric: str) -> float:
    """One headline metric of label sets, computing only what it needs (the paired
    bootstrap of the promotion gate calls it thousands of times)."""
    truth = np.asarray(truth, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    if metric in ("mean_average_precision", "roc_auc"):
        rank = average_precision if metric == "mean_average_precision" else roc_auc
        values = [rank(truth[:, j], proba[:, j]) for j in range(truth.shape[1])]
        return float(np.mean(values)) if values else 0.0
    if metric == "subset_accuracy":
        return float((truth == predicted).all(axis=1).mean()) if len(truth) else 0.0
    hit = truth & predicted
    if metric == "samples_f1":
        den = truth.sum(axis=1) + predicted.sum(axis=1)
        per_row = np.where(den > 0, 2 * hit.sum(axis=1) / np.maximum(den, 1), 1.0)
        return float(per_row.mean()) if len(truth) else 0.0
    tp = hit.sum(axis=0).astype(float)
    fp = (predicted & ~truth).sum(axis=0).astype(float)
    fn = (truth & ~predicted).sum(axis=0).astype(float)
    if metric == "micro_f1":
        return float(_f1(tp.sum(), fp.sum(), fn.sum()))
    if metric == "macro_f1":
        f1 = _f1(tp, fp, fn)
        return float(f1.mean()) if len(f1) else 0.0
    raise ValueError(f"{metric} is not a multi-label metric; use one of {', '.join(METRICS)}")
