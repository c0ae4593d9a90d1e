"""Ridge regression on frozen features (``task: regression``): the linear probe's analogue
for a float target.

Features are standardised with training statistics and the target centred by its training
mean (the unpenalised intercept). Every penalty of the grid is solved from one spectral
decomposition — of ``XᵀX`` when there are more rows than dimensions, of ``X`` itself
otherwise — the penalty with the best validation metric is kept, and the standardisation is
folded into the head's weights so that the saved head applies directly to raw vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from transferkit.regression import check_metric, score_regression
from transferkit.training.probe import BLOCK_ROWS, _moments, _standardized

log = logging.getLogger(__name__)


class RidgeFit(BaseModel):
    """The chosen penalty, its validation metric (as computed, not oriented) and the
    validation metric of every penalty tried."""

    alpha: float
    validation_metric: float
    grid: dict[str, float]


def _spectrum(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(λ, V, Vᵀ Xᵀ y)`` for standardised ``x`` and centred ``y``, all float64: ``λ`` the
    eigenvalues of ``XᵀX`` and ``V`` its eigenvectors (columns), so that the ridge weights
    for ``alpha`` are ``V (Vᵀ Xᵀ y) / (λ + alpha)``.

    With fewer rows than dimensions, from the thin SVD ``X = U S Vᵀ`` (``λ = S²`` and
    ``Vᵀ Xᵀ y = S Uᵀ y``): rows² × dims work instead of dims³.
    """
    rows, dims = x.shape
    if rows < dims:
        u, singular, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        return singular**2, vt.T, singular * (u.T @ y)
    gram = np.zeros((dims, dims))
    xty = np.zeros(dims)
    # float64 products by blocks: never a float64 copy of the whole matrix.
    for start in range(0, rows, BLOCK_ROWS):
        block = x[start : start + BLOCK_ROWS].astype(np.float64)
        gram += block.T @ block
        xty += block.T @ y[start : start + BLOCK_ROWS]
    eigenvalues, vectors = np.linalg.eigh(gram)
    return np.clip(eigenvalues, 0.0, None), vectors, vectors.T @ xty


def _weights(
    eigenvalues: np.ndarray, vectors: np.ndarray, projected: np.ndarray, alphas: np.ndarray
) -> np.ndarray:
    """Ridge weights [dims, alphas], one column per penalty. Directions whose eigenvalue is
    rounding noise get no weight: with ``alpha == 0`` that is the minimum-norm solution."""
    cutoff = eigenvalues.max(initial=0.0) * max(vectors.shape) * np.finfo(np.float64).eps
    kept = (eigenvalues > cutoff)[:, None]
    denominators = eigenvalues[:, None] + alphas[None, :]
    # The dropped directions divide by 1 (not by a zero) before np.where discards them.
    shrunk = np.where(kept, projected[:, None] / np.where(kept, denominators, 1.0), 0.0)
    return vectors @ shrunk


def _products(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``x @ weights`` in float64, ``BLOCK_ROWS`` rows of ``x`` at a time."""
    out = np.empty((len(x), weights.shape[1]))
    for start in range(0, len(x), BLOCK_ROWS):
        out[start : start + BLOCK_ROWS] = x[start : start + BLOCK_ROWS].astype(np.float64) @ weights
    return out


def _target(values: np.ndarray, rows: int, what: str, features: str) -> np.ndarray:
    """``values`` as a finite 1-D float64 target with one value per feature row."""
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"{what} has shape {y.shape}; pass one float per row (1-D)")
    if len(y) != rows:
        raise ValueError(
            f"{what} has {len(y)} rows but {features} has {rows}; pass one target per row"
        )
    bad = np.flatnonzero(~np.isfinite(y))
    if len(bad):
        raise ValueError(
            f"{what} has {len(bad)} non-finite value(s) (first at row {bad[0]}: {y[bad[0]]}); "
            "drop or fix those rows"
        )
    return y


def fit_ridge(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    alphas: Sequence[float],
    primary_metric: str,
    overwrite: bool = False,
) -> tuple[nn.Linear, RidgeFit]:
    """Fit ridge regression for every penalty, keep the best on validation, fold the
    standardisation in.

    Per penalty ``alpha`` the objective is ``|y - Xw - b|² + alpha |w|²`` on standardised
    ``X`` with an unpenalised intercept ``b`` (scikit-learn Ridge's convention). All
    penalties come from one decomposition, so the grid costs little more than one fit.

    Args:
        train_x: training features [rows, dims].
        train_y: training targets [rows].
        val_x: validation features [rows, dims].
        val_y: validation targets [rows].
        alphas: the penalties to try (``strategy.ridge_alphas``: its default is a grid wide
            enough for 384–4096-dim sentence features on 1k–70k rows); each ``>= 0``.
        primary_metric: one of ``transferkit.regression.METRICS``, compared with higher
            better (rmse and mae negated); on ties the larger penalty wins.
        overwrite: the caller has no further use for ``train_x`` and ``val_x``, which may
            then be standardised in place.

    Returns:
        A float32 ``nn.Linear(dims, 1)`` for raw features, and the selection record.

    Raises:
        ValueError: an empty or negative penalty grid, an unknown metric, empty splits,
            mismatched rows or dimensions, or non-finite targets or features.
    """
    check_metric(primary_metric)
    grid_alphas = np.array(sorted({float(a) for a in alphas}, reverse=True))
    if len(grid_alphas) == 0:
        raise ValueError("alphas is empty; pass at least one penalty (strategy.ridge_alphas)")
    if not np.all(np.isfinite(grid_alphas)) or grid_alphas.min() < 0:
        raise ValueError(
            f"alphas {list(alphas)} holds a negative or non-finite penalty; pass values >= 0"
        )
    if np.ndim(train_x) != 2 or np.ndim(val_x) != 2:
        raise ValueError(
            f"features must be [rows, dims]; got train_x {np.shape(train_x)} and val_x "
            f"{np.shape(val_x)}"
        )
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError(
            f"train_x has {len(train_x)} rows and val_x {len(val_x)}; both splits need rows"
        )
    dims = train_x.shape[1]
    if val_x.shape[1] != dims:
        raise ValueError(
            f"val_x has {val_x.shape[1]} dimensions but train_x has {dims}; embed both "
            "splits with the same backbone"
        )
    y = _target(train_y, len(train_x), "train_y", "train_x")
    yv = _target(val_y, len(val_x), "val_y", "val_x")

    mean, std = _moments(train_x)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise ValueError("train_x holds non-finite values; drop or fix those rows")
    std = np.where(std < 1e-8, 1.0, std)
    intercept = float(y.mean())
    eigenvalues, vectors, projected = _spectrum(
        _standardized(train_x, mean, std, overwrite), y - intercept
    )
    weights = _weights(eigenvalues, vectors, projected, grid_alphas)
    predictions = _products(_standardized(val_x, mean, std, overwrite), weights) + intercept
    if not np.all(np.isfinite(predictions)):
        raise ValueError("val_x holds non-finite values; drop or fix those rows")

    best: tuple[int, float, float] | None = None  # (column, oriented, as computed)
    grid: dict[str, float] = {}
    # Strongest penalty first: on ties the simpler model wins.
    for column, alpha in enumerate(grid_alphas):
        scores = score_regression(yv, predictions[:, column])
        value = scores.metric(primary_metric)
        grid[f"{alpha:g}"] = value
        log.info("ridge alpha=%g: validation %s %.4f", alpha, primary_metric, value)
        if best is None or scores.oriented(primary_metric) > best[1]:
            best = (column, scores.oriented(primary_metric), value)
    assert best is not None
    column, _, value = best

    folded = nn.Linear(dims, 1)
    with torch.no_grad():
        weight = weights[:, column] / std
        folded.weight.copy_(torch.from_numpy(weight).float().unsqueeze(0))
        folded.bias.fill_(intercept - float(weight @ mean))
    return folded, RidgeFit(alpha=float(grid_alphas[column]), validation_metric=value, grid=grid)
