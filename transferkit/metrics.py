"""Classification metrics, computed exactly from labels and predictions (no sampling)."""

from __future__ import annotations

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
