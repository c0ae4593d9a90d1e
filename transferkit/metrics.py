"""Classification metrics from labels and predictions, and paired tests between two models."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel

from transferkit.multilabel import MultiLabelScores, score_sets, set_metric
from transferkit.ranks import roc_auc
from transferkit.regression import RegressionScores, orientation, score_regression


class ClassScores(BaseModel):
    """Per-class precision, recall, F1 and support."""

    precision: float
    recall: float
    f1: float
    support: int


class Scores(BaseModel):
    """Headline metrics, per-class scores and the confusion matrix (rows: true labels).

    ``roc_auc`` needs class probabilities (one-vs-rest macro average beyond two labels);
    ``sensitivity`` and ``specificity`` are the recall of the positive and the negative label
    of a binary task.
    """

    accuracy: float
    macro_f1: float
    balanced_accuracy: float = 0.0
    roc_auc: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    positive_label: str | None = None
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]]
    labels: list[str]
    rows: int

    def metric(self, name: str) -> float:
        """A headline metric by its config name (``evaluation.primary_metric``).

        Raises:
            ValueError: roc_auc of scores computed without probabilities.
        """
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} needs class probabilities; pass proba to score()")
        return float(value)


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    fpr, tpr, _ = roc_points(positive, scores)
    return fpr, tpr


def roc_points(
    positive: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with its thresholds: a score ≥ threshold is called positive (the first
    threshold is +inf: nothing called positive)."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    hits = positive[order]
    last = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), len(hits) - 1]
    tp = np.cumsum(hits)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / max(int(positive.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~positive).sum()), 1)]
    return fpr, tpr, np.r_[np.inf, sorted_scores[last]]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Confusion counts [true, predicted]."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def score_task(
    truth: np.ndarray,
    predicted: np.ndarray,
    proba: np.ndarray,
    labels: list[str],
    positive: int | None = None,
) -> Scores | MultiLabelScores | RegressionScores:
    """Scores of a model's decisions on one split, for its task as its truth says: label
    sets (a 2-D boolean truth), scores (a float truth, ``predicted`` the predicted scores) or
    class ids."""
    if np.ndim(truth) == 2:
        return score_sets(truth, predicted, proba, labels)
    if np.asarray(truth).dtype.kind == "f":
        return score_regression(truth, predicted)
    return score(truth, predicted, labels, proba, positive)


def score(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    labels: list[str],
    proba: np.ndarray | None = None,
    positive: int | None = None,
) -> Scores:
    """Accuracy, macro-F1, balanced accuracy and per-class scores of integer predictions;
    with ``proba`` [rows, labels] also ROC-AUC.

    Classes absent from both truth and predictions get zero scores and still count in the
    macro average, as in scikit-learn's ``f1_score(average='macro', labels=all)``; balanced
    accuracy averages the recall of the classes present in the truth.

    Args:
        positive: index of the positive label of a binary task (default 1).
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
    present = actual > 0
    binary = len(labels) == 2
    pos = 1 if positive is None else positive
    auc = None
    if proba is not None:
        if binary:
            auc = roc_auc(y_true == pos, proba[:, pos])
        else:
            aucs = [roc_auc(y_true == k, proba[:, k]) for k in range(len(labels)) if present[k]]
            auc = float(np.mean(aucs)) if aucs else 0.5
    return Scores(
        accuracy=float(tp.sum() / max(len(y_true), 1)),
        macro_f1=float(f1.mean()),
        balanced_accuracy=float(recall[present].mean()) if present.any() else 0.0,
        roc_auc=auc,
        sensitivity=float(recall[pos]) if binary else None,
        specificity=float(recall[1 - pos]) if binary else None,
        positive_label=labels[pos] if binary else None,
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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits [rows, labels], computed stably."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class Decision(BaseModel):
    """How class probabilities become predicted labels: the most probable label, or, for a
    binary task with a threshold (``training.decision_threshold``), the positive label when
    its probability reaches the threshold; for label sets, every label whose probability
    reaches its own threshold. Recorded with the model (its card)."""

    positive: int | None = None
    threshold: float | None = None
    # task: multi_label: one threshold per label (training.label_thresholds); a label is in
    # the predicted set when its probability reaches its threshold.
    thresholds: list[float] | None = None

    def apply(self, proba: np.ndarray) -> np.ndarray:
        """Predicted label ids [rows] of class probabilities [rows, labels]; for a
        multi-label model (``thresholds``) the predicted sets, boolean [rows, labels]."""
        proba = np.asarray(proba)
        if self.thresholds is not None:
            return proba >= np.asarray(self.thresholds, dtype=proba.dtype)
        if self.threshold is None or self.positive is None:
            return proba.argmax(axis=1)
        chosen = proba[:, self.positive] >= self.threshold
        return np.where(chosen, self.positive, 1 - self.positive).astype(np.int64)


def tune_threshold(
    truth: np.ndarray, proba: np.ndarray, positive: int, metric: str
) -> tuple[float, float]:
    """The threshold on the positive label's probability that maximises ``metric`` (accuracy,
    macro_f1 or balanced_accuracy) of a binary task; ties go to the threshold nearest 0.5.

    Every distinct cut is tried at once: rows sorted by probability, the positives and
    negatives above each cut counted cumulatively.

    Returns:
        (threshold, the metric there). The threshold lies midway between the probabilities
        it separates, so that rows at those probabilities keep their side.
    """
    truth = np.asarray(truth) == positive
    p = np.asarray(proba, dtype=np.float64)[:, positive]
    order = np.argsort(-p, kind="stable")
    p_sorted, hits = p[order], truth[order]
    # Cut after the last row of each group of equal probabilities: predicted positive = above.
    ends = np.flatnonzero(np.r_[p_sorted[1:] != p_sorted[:-1], True])
    tp = np.r_[0, np.cumsum(hits)[ends]].astype(float)
    k = np.r_[0, ends + 1].astype(float)  # rows predicted positive at each cut
    fp = k - tp
    pos, n = float(truth.sum()), float(len(truth))
    neg = n - pos
    fn, tn = pos - tp, neg - fp
    if metric == "accuracy":
        values = (tp + tn) / max(n, 1.0)
    elif metric == "balanced_accuracy":
        recalls = [tp / pos] if pos else []
        recalls += [tn / neg] if neg else []
        values = np.mean(recalls, axis=0) if recalls else np.zeros_like(tp)
    elif metric == "macro_f1":
        f1_pos = np.divide(
            2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0
        )
        f1_neg = np.divide(
            2 * tn, 2 * tn + fn + fp, out=np.zeros_like(tn), where=2 * tn + fn + fp > 0
        )
        values = (f1_pos + f1_neg) / 2
    else:
        raise ValueError(
            f"no threshold maximises {metric}; use accuracy, macro_f1 or balanced_accuracy"
        )
    # Thresholds: above the highest probability (nothing positive), then midway below each
    # group down to the lowest probability itself (everything positive).
    lower = np.r_[p_sorted[ends[:-1] + 1], p_sorted[-1]] if len(ends) else np.array([])
    upper = p_sorted[ends]
    cuts = np.r_[np.nextafter(p_sorted[0], np.inf), (upper + lower) / 2]
    cuts[-1] = p_sorted[-1]
    best = np.flatnonzero(values >= values.max() - 1e-12)
    pick = best[np.argmin(np.abs(cuts[best] - 0.5))]
    return float(cuts[pick]), float(values[pick])


def metric_of_logits(
    truth: np.ndarray, logits: np.ndarray, labels: list[str], metric: str
) -> float:
    """One headline metric of class logits (selection during training; the choice of the
    positive label changes none of the selectable metrics)."""
    if metric == "accuracy":  # without the per-label curves score() also computes
        return float((np.asarray(logits).argmax(axis=1) == np.asarray(truth)).mean())
    proba = softmax(np.asarray(logits, dtype=np.float64))
    return score(truth, proba.argmax(axis=1), labels, proba).metric(metric)


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


def _split(outputs: np.ndarray, predicted: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """(predicted ids, probabilities or None) of a model's outputs: ids [rows], or
    probabilities [rows, labels] decided by ``predicted`` (else by argmax)."""
    if outputs.ndim == 2:
        return (outputs.argmax(axis=1) if predicted is None else np.asarray(predicted)), outputs
    return outputs, None


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
    positive: int | None = None,
    challenger_predicted: np.ndarray | None = None,
    champion_predicted: np.ndarray | None = None,
) -> PairedComparison:
    """Compare two classifiers' predictions on the same rows.

    Args:
        truth: true label ids, or label sets [rows, labels] (boolean; both models' decided
            sets are then given as ``*_predicted``, their probabilities as the models').
        challenger: the new model's predicted ids [rows], or its class probabilities
            [rows, labels] (needed for roc_auc).
        champion: the current champion's, in the same form, on the same rows.
        labels: label names (for macro-F1).
        metric: accuracy, macro_f1, balanced_accuracy or roc_auc.
        method: 'mcnemar' (exact test on the discordant rows, Wald interval on the accuracy
            difference) or 'bootstrap' (paired resampling of rows, percentile interval and
            one-sided p on the metric difference).
        alpha: one-sided significance level.
        samples: bootstrap resamples.
        seed: bootstrap seed (the result is reproducible).
        challenger_predicted, champion_predicted: each model's predicted ids when it decides
            by a threshold (``Decision``), not by the most probable label.
    """
    from statistics import NormalDist

    truth = np.asarray(truth)
    sets = truth.ndim == 2  # label sets (task: multi_label): decisions given, probabilities
    scores = truth.dtype.kind == "f"  # scores (task: regression): the outputs [rows, 1]
    # The gain is signed so that positive is better (an error that falls is a gain).
    sign = orientation(metric)
    if scores:
        new_ids, new_proba = np.asarray(challenger, dtype=np.float64)[:, 0], None
        old_ids, old_proba = np.asarray(champion, dtype=np.float64)[:, 0], None
        right_new = right_old = np.zeros(len(truth), dtype=bool)  # no row is right or wrong
    elif sets:
        assert challenger_predicted is not None
        assert champion_predicted is not None
        new_ids, new_proba = np.asarray(challenger_predicted), np.asarray(challenger)
        old_ids, old_proba = np.asarray(champion_predicted), np.asarray(champion)
        right_new = (new_ids == truth).all(axis=1)  # the whole set right
        right_old = (old_ids == truth).all(axis=1)
    else:
        new_ids, new_proba = _split(np.asarray(challenger), challenger_predicted)
        old_ids, old_proba = _split(np.asarray(champion), champion_predicted)
        right_new, right_old = new_ids == truth, old_ids == truth
    only_new = int((right_new & ~right_old).sum())
    only_old = int((right_old & ~right_new).sum())
    rows = len(truth)

    def value(rows: Any, ids: np.ndarray, proba: np.ndarray | None) -> float:
        """The metric on ``rows`` (an index, or every row)."""
        chosen = None if proba is None else proba[rows]
        if scores:
            return score_regression(truth[rows], ids[rows]).metric(metric)
        if sets:
            assert chosen is not None
            return set_metric(truth[rows], ids[rows], chosen, metric)
        return score(truth[rows], ids[rows], labels, chosen, positive).metric(metric)

    every = slice(None)
    new_value, old_value = value(every, new_ids, new_proba), value(every, old_ids, old_proba)
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
            gains[i] = sign * (value(index, new_ids, new_proba) - value(index, old_ids, old_proba))
        p_value = float((gains <= 0).mean())
        low, high = (float(q) for q in np.quantile(gains, [alpha, 1 - alpha]))
    return PairedComparison(
        method=method,
        metric=metric,
        rows=rows,
        challenger=new_value,
        champion=old_value,
        gain=sign * (new_value - old_value),
        p_value=p_value,
        ci_low=low,
        ci_high=high,
        ci_level=level,
        challenger_only_right=only_new,
        champion_only_right=only_old,
    )
