"""Linear probe: multinomial logistic regression on frozen features (one logistic regression
per label for label sets).

Features are standardised with training statistics, the L2 penalty is chosen on the
validation split from a small grid, and the standardisation is folded into the head's
weights so that the saved head applies directly to raw pooled vectors.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from transferkit.metrics import metric_of_logits
from transferkit.multilabel import metric_of_set_logits
from transferkit.progress import note

# L-BFGS stops when the largest gradient entry or the change of the loss falls below these.
# The features are held in DTYPE (the products with them run in it), the weights in float64:
# on the quickstart's 60,614 SST-2 vectors the same penalty and accuracies as all-float64 at
# 1e-7 / 1e-10, in half the time (bench/probe.py: Banking77-sized, the same test accuracy as
# scikit-learn's default lbfgs). All-float32 weights stall under a huge penalty (l2 = 1e6).
TOLERANCE_GRAD = 1e-5
TOLERANCE_CHANGE = 1e-9
DTYPE = np.float32


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
    start: nn.Linear | None = None,
) -> nn.Linear:
    """Minimise the (row-weighted) mean cross-entropy plus ``l2/2 * |W|^2`` with L-BFGS,
    from ``start``'s weights (a warm start) or from zero. ``y``: label ids [rows], or label
    sets [rows, labels] (0/1), for which the loss is one binary log-loss per label.

    The loss and its gradient are written out (softmax minus one-hot, then one product with
    the features) rather than taken by autograd: one pass over the features per evaluation
    instead of three.
    """
    head = nn.Linear(x.shape[1], num_labels, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(start.weight if start is not None else torch.zeros_like(head.weight))
        head.bias.copy_(start.bias if start is not None else torch.zeros_like(head.bias))
    optimizer = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=TOLERANCE_GRAD,
        tolerance_change=TOLERANCE_CHANGE,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    sets = y.dim() == 2  # label sets (multi_label): a sigmoid and a log-loss per label
    if sets:
        rows = torch.ones(len(y), dtype=torch.float64)
        targets = y.double()
    else:
        rows = torch.ones(len(y), dtype=torch.float64) if weights is None else weights[y].double()
        targets = nn.functional.one_hot(y, num_labels).double()
    rows = rows / len(y)  # each row weighs its label's weight; the mean over rows

    @torch.no_grad()
    def closure() -> torch.Tensor:
        # The two products with the features in their dtype (float32: half the memory
        # traffic); the weights, the optimiser's state and everything else in float64.
        logits = (x @ head.weight.t().to(x.dtype)).double().add_(head.bias)
        if sets:
            # -[t log s(z) + (1 - t) log s(-z)], whose gradient in z is s(z) - t.
            log_loss = -(targets * nn.functional.logsigmoid(logits)).add_(
                (1 - targets) * nn.functional.logsigmoid(-logits)
            )
            fit = (rows * log_loss.sum(dim=1)).sum()
            residual = (logits.sigmoid_() - targets).mul_(rows.unsqueeze(1))
        else:
            log_p = logits.log_softmax(dim=1)
            fit = -(rows * (log_p * targets).sum(dim=1)).sum()
            residual = (log_p.exp_() - targets).mul_(rows.unsqueeze(1))
        head.weight.grad = (residual.t().to(x.dtype) @ x).double() + l2 * head.weight
        head.bias.grad = residual.sum(dim=0)
        return fit + 0.5 * l2 * head.weight.pow(2).sum()

    optimizer.step(closure)
    return head


# Rows per block of the standardisation: float64 work on a few MB at a time, never a float64
# copy of the whole matrix (the quickstart's would be 186 MB; fresh memory that size costs
# seconds on a VM that hands freed pages back to its host).
BLOCK_ROWS = 2048


def _centred_blocks(x: np.ndarray, mean: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``x - mean`` in float64, ``BLOCK_ROWS`` rows at a time, each block's first row with it;
    every block is the same reused buffer, overwritten by the next."""
    buffer = np.empty((min(BLOCK_ROWS, len(x)), x.shape[1]))
    for start in range(0, len(x), BLOCK_ROWS):
        block = x[start : start + BLOCK_ROWS]
        yield start, np.subtract(block, mean, out=buffer[: len(block)])


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and (population) standard deviations in float64, two passes by blocks."""
    rows = max(len(x), 1)
    total = np.zeros(x.shape[1])
    for start in range(0, len(x), BLOCK_ROWS):
        total += x[start : start + BLOCK_ROWS].sum(axis=0, dtype=np.float64)
    mean = total / rows
    squares = np.zeros(x.shape[1])
    for _, centred in _centred_blocks(x, mean):
        squares += np.einsum("ij,ij->j", centred, centred)
    return mean, np.sqrt(squares / rows)


def _standardized(
    x: np.ndarray, mean: np.ndarray, std: np.ndarray, in_place: bool = False
) -> np.ndarray:
    """``(x - mean) / std`` computed in float64 and stored in DTYPE, by blocks; ``in_place``:
    into ``x`` itself when it is a writeable DTYPE array (no second matrix: fresh memory is
    slow on some VMs, about 1 s for 100 MB)."""
    usable = in_place and x.dtype == DTYPE and x.flags.writeable and x.flags.c_contiguous
    out = x if usable else np.empty(x.shape, dtype=DTYPE)
    for start, centred in _centred_blocks(x, mean):
        out[start : start + len(centred)] = np.divide(centred, std, out=centred)
    return out


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
    overwrite: bool = False,
) -> tuple[nn.Linear, ProbeFit]:
    """Fit one head per L2 penalty, keep the best on validation, fold the standardisation in.

    The objective is convex; the strongest penalty starts from zero weights and each next
    one from the previous solution, so the fit is deterministic.
    ``standardize=False`` fits on the raw features (a handful of examples cannot estimate
    per-dimension scales). ``class_weights`` (one per label) weigh each row's loss by its
    label (``training.class_weights``). ``overwrite``: the caller has no further use for
    ``train_x`` and ``val_x``, which may then be standardised in place.

    Returns:
        A float32 ``nn.Linear`` for raw features, and the selection record.
    """
    dims = train_x.shape[1]
    mean, std = _moments(train_x) if standardize else (np.zeros(dims), np.ones(dims))
    std = np.where(std < 1e-8, 1.0, std)
    x = torch.from_numpy(_standardized(train_x, mean, std, overwrite))
    sets = np.ndim(train_y) == 2  # label sets (task: multi_label)
    y = torch.from_numpy(np.asarray(train_y, dtype=np.float32 if sets else np.int64))
    xv = torch.from_numpy(_standardized(val_x, mean, std, overwrite))
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=x.dtype)
    best: tuple[float, float, nn.Linear] | None = None
    grid: dict[str, float] = {}
    # Strongest penalty first: on ties the simpler model wins. Each fit starts from the
    # previous penalty's solution, near its own (the objective is convex: the same minimum).
    head: nn.Linear | None = None
    penalties = sorted(l2_grid, reverse=True)
    for number, l2 in enumerate(penalties, start=1):
        head = _fit(x, y, len(labels), l2, max_iter, weights, start=head)
        with torch.no_grad():
            logits = head(xv.double()).numpy()
        value = (metric_of_set_logits if sets else metric_of_logits)(
            val_y, logits, labels, primary_metric
        )
        grid[f"{l2:g}"] = value
        note(
            f"probe: penalty {number}/{len(penalties)} (l2={l2:g}), "
            f"validation {primary_metric} {value:.4f}"
        )
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
