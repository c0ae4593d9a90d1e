"""Linear probe: multinomial logistic regression on frozen features.

Features are standardised with training statistics, the L2 penalty is chosen on the
validation split from a small grid, and the standardisation is folded into the head's
weights so that the saved head applies directly to raw pooled vectors.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from transferkit.metrics import metric_of_logits

log = logging.getLogger(__name__)


class ProbeFit(BaseModel):
    """The chosen penalty and the validation metric of every penalty tried."""

    l2: float
    validation_metric: float
    grid: dict[str, float]


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    num_labels: int,
    l2: float,
    max_iter: int,
    weights: torch.Tensor | None = None,
) -> nn.Linear:
    head = nn.Linear(x.shape[1], num_labels, dtype=torch.float64)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        if weights is None:
            fit = nn.functional.cross_entropy(head(x), y)
        else:  # each row weighs its label's weight; the mean over rows, as unweighted
            fit = (nn.functional.cross_entropy(head(x), y, reduction="none") * weights[y]).mean()
        loss = fit + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    labels: list[str],
    l2_grid: list[float],
    max_iter: int,
    primary_metric: str,
    standardize: bool = True,
    class_weights: np.ndarray | None = None,
) -> tuple[nn.Linear, ProbeFit]:
    """Fit one head per L2 penalty, keep the best on validation, fold the standardisation in.

    The objective is convex and starts from zero weights, so the fit is deterministic.
    ``standardize=False`` fits on the raw features (a handful of examples cannot estimate
    per-dimension scales). ``class_weights`` (one per label) weigh each row's loss by its
    label (``training.class_weights``).

    Returns:
        A float32 ``nn.Linear`` for raw features, and the selection record.
    """
    dims = train_x.shape[1]
    mean = train_x.mean(axis=0, dtype=np.float64) if standardize else np.zeros(dims)
    std = train_x.std(axis=0, dtype=np.float64) if standardize else np.ones(dims)
    std = np.where(std < 1e-8, 1.0, std)
    x = torch.from_numpy((train_x - mean) / std)
    y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    xv = torch.from_numpy((val_x - mean) / std)
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=x.dtype)
    best: tuple[float, float, nn.Linear] | None = None
    grid: dict[str, float] = {}
    # Strongest penalty first: on ties the simpler model wins.
    for l2 in sorted(l2_grid, reverse=True):
        head = _fit(x, y, len(labels), l2, max_iter, weights)
        with torch.no_grad():
            logits = head(xv).numpy()
        value = metric_of_logits(val_y, logits, labels, primary_metric)
        grid[f"{l2:g}"] = value
        log.info("probe l2=%g: validation %s %.4f", l2, primary_metric, value)
        if best is None or value > best[1]:
            best = (l2, value, head)
    assert best is not None
    l2, value, head = best
    folded = nn.Linear(train_x.shape[1], len(labels))
    with torch.no_grad():
        weight = head.weight / torch.from_numpy(std)
        folded.weight.copy_(weight.float())
        folded.bias.copy_((head.bias - weight @ torch.from_numpy(mean)).float())
    return folded, ProbeFit(l2=l2, validation_metric=value, grid=grid)
