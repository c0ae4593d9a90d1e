"""What fine-tuning minimises and selects checkpoints by, per task (``config.task``).

- classification: cross-entropy on label ids, weighted per label (``training.class_weights``);
- multi_label: binary cross-entropy per label on the rows' label sets (a sigmoid per label);
- regression: mean squared error on the targets scaled to [0, 1] by the training range, the
  scale folded back into the head at the end, so the saved model outputs scores as they are.

Checkpoints are compared on the primary metric oriented so that higher is better (an RMSE
is negated), and reported as measured.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from transferkit.config import PipelineConfig
from transferkit.metrics import metric_of_logits
from transferkit.multilabel import metric_of_set_logits
from transferkit.regression import orientation, score_regression
from transferkit.training.imbalance import weighted_cross_entropy


class Objective:
    """The loss of a batch and the validation metric of a task."""

    def __init__(
        self,
        config: PipelineConfig,
        train_labels: np.ndarray,
        labels: list[str],
        class_weights: np.ndarray | None = None,
    ) -> None:
        self.task = config.task
        self.metric = config.evaluation.primary_metric
        self.labels = labels
        self.smoothing = config.training.label_smoothing
        self.low, self.span = 0.0, 1.0
        self.row_weights: torch.Tensor | None = None
        if self.task == "regression":
            values = np.asarray(train_labels, dtype=np.float64)
            self.low = float(values.min())
            self.span = float(values.max() - values.min()) or 1.0
            scaled = (values - self.low) / self.span
            self.targets = torch.as_tensor(scaled, dtype=torch.float32)
        elif self.task == "multi_label":
            self.targets = torch.as_tensor(np.asarray(train_labels, dtype=np.float32))
        else:
            self.targets = torch.as_tensor(train_labels, dtype=torch.long)
            if class_weights is not None:
                self.row_weights = torch.as_tensor(class_weights)[self.targets]

    def start(self, head: nn.Linear) -> None:
        """Bring a regression head, which outputs scores, to the scaled targets' space that
        training works in (``finish`` takes it back)."""
        if self.task == "regression":
            with torch.no_grad():
                head.weight.div_(self.span)
                head.bias.sub_(self.low).div_(self.span)

    def loss(self, outputs: torch.Tensor, rows: np.ndarray, reduction: str) -> torch.Tensor:
        """The loss of the model's ``outputs`` [batch, labels] for the training ``rows``:
        the mean over rows, or their sum (``reduction`` 'sum', data-parallel shards)."""
        device = outputs.device
        outputs = outputs.float()
        if self.task == "classification":
            weights = None if self.row_weights is None else self.row_weights[rows].to(device)
            return weighted_cross_entropy(
                outputs, self.targets[rows].to(device), weights, self.smoothing, reduction
            )
        if self.task == "multi_label":
            target = self.targets[rows].to(device)
            if self.smoothing:
                target = target * (1 - self.smoothing) + self.smoothing / 2
            per_row = nn.functional.binary_cross_entropy_with_logits(
                outputs, target, reduction="none"
            ).mean(dim=1)
        else:
            per_row = (outputs[:, 0] - self.targets[rows].to(device)) ** 2
        return per_row.mean() if reduction == "mean" else per_row.sum()

    def measure(self, truth: np.ndarray, outputs: np.ndarray) -> float:
        """The primary metric of the model's ``outputs`` for rows whose labels are ``truth``
        (multi-label: each label at its F1-best threshold on these rows)."""
        if self.task == "regression":
            predicted = self.low + self.span * np.asarray(outputs, dtype=np.float64)[:, 0]
            return score_regression(truth, predicted).metric(self.metric)
        if self.task == "multi_label":
            return metric_of_set_logits(truth, outputs, self.labels, self.metric)
        return metric_of_logits(truth, outputs, self.labels, self.metric)

    def better(self, value: float, best: float) -> bool:
        """Whether a checkpoint measuring ``value`` beats one measuring ``best``."""
        return orientation(self.metric) * (value - best) > 0

    def finish(self, head: nn.Linear) -> None:
        """Fold the target scale back into a regression head: it then outputs scores."""
        if self.task == "regression":
            with torch.no_grad():
                head.weight.mul_(self.span)
                head.bias.mul_(self.span).add_(self.low)
