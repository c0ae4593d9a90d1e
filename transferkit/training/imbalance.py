"""Class imbalance: label weights of the training loss and the decision threshold of a
binary model (``training.class_weights``, ``training.decision_threshold``)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from transferkit.data import LabelMap
from transferkit.errors import DataError
from transferkit.metrics import Decision, tune_threshold
from transferkit.multilabel import set_metric, tune_thresholds

log = logging.getLogger(__name__)


def class_weights(setting: Any, truth: np.ndarray, label_map: LabelMap) -> np.ndarray | None:
    """One loss weight per label id, or None when every row weighs the same.

    Args:
        setting: ``training.class_weights``: 'none', 'balanced' or {label: weight}.
        truth: label ids of the training rows the strategy reads.
        label_map: the dataset's labels (a mapping may name display names or raw values).

    Raises:
        DataError: 'balanced' with a label absent from the training rows, or a mapping that
            names no label of the data.
    """
    if setting == "none":
        return None
    labels = len(label_map)
    if setting == "balanced":
        counts = np.bincount(np.asarray(truth, dtype=np.int64), minlength=labels)
        missing = [label_map.names[i] for i in np.flatnonzero(counts == 0)]
        if missing:
            raise DataError(
                f"training.class_weights: balanced weighs a label by its training rows, and "
                f"{', '.join(missing)} has none; give the weights as a mapping or add rows"
            )
        weights = len(truth) / (labels * counts.astype(np.float64))
    else:
        weights = np.ones(labels)
        for key, value in setting.items():
            if key in label_map.names:
                weights[label_map.names.index(key)] = value
            elif key in label_map.values:
                weights[label_map.values.index(key)] = value
            else:
                raise DataError(
                    f"training.class_weights names {key!r}, not a label (labels: "
                    f"{', '.join(label_map.names)}); fix its keys"
                )
    log.info(
        "class weights: %s",
        ", ".join(f"{n} {w:.3g}" for n, w in zip(label_map.names, weights, strict=True)),
    )
    return weights


def decision(
    setting: Any,
    label_map: LabelMap,
    positive_label: str | None,
    metric: str,
    validation: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[Decision | None, dict[str, float]]:
    """The model's decision rule (None: the most probable label), and what choosing it
    measured on validation.

    Args:
        setting: ``training.decision_threshold``: 'argmax', 'tuned' or a threshold.
        positive_label: ``evaluation.positive_label`` (unset: the second label).
        metric: the primary metric a tuned threshold maximises.
        validation: (label ids, class probabilities) of the validation split, for 'tuned'.

    Raises:
        DataError: a threshold for a task that is not binary.
    """
    if setting == "argmax":
        return None, {}
    if len(label_map) != 2:
        raise DataError(
            f"training.decision_threshold: a threshold decides between two labels, and the "
            f"data has {len(label_map)} ({', '.join(label_map.names[:5])}…); use argmax"
        )
    positive = label_map.positive(positive_label)
    positive = 1 if positive is None else positive
    if setting != "tuned":
        return Decision(positive=positive, threshold=float(setting)), {}
    assert validation is not None
    truth, proba = validation
    threshold, value = tune_threshold(truth, proba, positive, metric)
    at_argmax = Decision().apply(proba) == truth
    record = {
        "threshold": threshold,
        f"validation_{metric}": value,
        "validation_accuracy_argmax": float(at_argmax.mean()),
    }
    log.info(
        "decision threshold %.4f on p(%s): validation %s %.4f",
        threshold,
        label_map.names[positive],
        metric,
        value,
    )
    return Decision(positive=positive, threshold=threshold), record


def weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor | None,
    label_smoothing: float,
    reduction: str,
) -> torch.Tensor:
    """Cross-entropy with each row weighed by its label (``row_weights``, None: unweighted),
    reduced by 'mean' or 'sum' over rows, so that one process and several agree."""
    if row_weights is None:
        return torch.nn.functional.cross_entropy(
            logits, targets, label_smoothing=label_smoothing, reduction=reduction
        )
    per_row = torch.nn.functional.cross_entropy(
        logits, targets, label_smoothing=label_smoothing, reduction="none"
    ) * row_weights.to(logits.dtype)
    return per_row.mean() if reduction == "mean" else per_row.sum()


def label_thresholds(
    setting: str | float,
    labels: list[str],
    metric: str,
    validation: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[Decision, dict[str, float]]:
    """A multi-label model's thresholds (``training.label_thresholds``), and what choosing
    them measured on validation.

    Args:
        setting: 'per_label', 'global' or one threshold for every label.
        labels: label names.
        metric: the primary metric ('global' maximises it; 'per_label' each label's F1).
        validation: (label sets [rows, labels], probabilities) of the validation split, for
            the tuned settings.
    """
    if not isinstance(setting, str):
        return Decision(thresholds=[float(setting)] * len(labels)), {}
    assert validation is not None
    truth, proba = validation
    cuts = tune_thresholds(truth, proba, setting, metric)  # type: ignore[arg-type]
    tuned = set_metric(truth, proba >= cuts, proba, metric)
    at_half = set_metric(truth, proba >= 0.5, proba, metric)
    log.info(
        "label thresholds (%s, %.3f-%.3f): validation %s %.4f (%.4f at 0.5)",
        setting,
        float(cuts.min()),
        float(cuts.max()),
        metric,
        tuned,
        at_half,
    )
    return Decision(thresholds=[float(c) for c in cuts]), {
        f"validation_{metric}": tuned,
        f"validation_{metric}_at_0.5": at_half,
    }
