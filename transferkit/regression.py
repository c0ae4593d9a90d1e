"""Regression metrics: a float score per row (``task: regression``, e.g. STS-B similarity 0–5).

Pure numpy: the metrics of a prediction against the truth, and the orientation that lets a
selection loop compare any of them with "higher is better" (``RegressionScores.oriented``).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from transferkit.ranks import average_ranks

METRICS = ("rmse", "mae", "r2", "pearson", "spearman")
LOWER_IS_BETTER = frozenset({"rmse", "mae"})


def orientation(metric: str) -> float:
    """1.0 when a higher ``metric`` is better, -1.0 for an error (rmse, mae): multiplying a
    difference of two values by it gives a gain, positive when the second one is worse."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def check_metric(name: str) -> str:
    """``name`` itself when it names a regression metric.

    Raises:
        ValueError: ``name`` is not one of ``METRICS``.
    """
    if name not in METRICS:
        raise ValueError(f"unknown regression metric {name!r}; use one of {', '.join(METRICS)}")
    return name


class RegressionScores(BaseModel):
    """Headline metrics of a regression: errors in the target's unit, and how well the
    prediction orders and explains the truth."""

    rmse: float
    mae: float
    r2: float
    pearson: float
    spearman: float
    rows: int

    def metric(self, name: str) -> float:
        """A metric by its config name (``evaluation.primary_metric``), as computed.

        Raises:
            ValueError: ``name`` is not one of ``METRICS``.
        """
        return float(getattr(self, check_metric(name)))

    def oriented(self, name: str) -> float:
        """A metric oriented so that higher is always better (rmse and mae negated).

        Raises:
            ValueError: ``name`` is not one of ``METRICS``.
        """
        return orientation(name) * self.metric(name)


def _vector(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as a finite, non-empty 1-D float64 array, or a one-line ValueError."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} has shape {array.shape}; pass one float per row (1-D)")
    if len(array) == 0:
        raise ValueError(f"{what} is empty; pass at least one row")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(
            f"{what} has {len(bad)} non-finite value(s) (first at row {bad[0]}: "
            f"{array[bad[0]]}); drop or fix those rows"
        )
    return array


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; 0.0 when either side is constant (no linear relation to measure)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    dx = x - x.mean()
    dy = y - y.mean()
    # Scale-free: dividing by the largest deviation keeps the squares from overflowing.
    dx, dy = dx / np.abs(dx).max(), dy / np.abs(dy).max()
    return float(np.clip((dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy)), -1.0, 1.0))


def score_regression(truth: np.ndarray, predicted: np.ndarray) -> RegressionScores:
    """Every regression metric of ``predicted`` against ``truth``.

    r2 is ``1 - SSE/SST`` (0.0 when the truth is constant: nothing to explain); Spearman is
    the Pearson correlation of average ranks (ties share their mean rank). A constant truth
    or prediction gives pearson and spearman 0.0, never NaN.

    Args:
        truth: the true score of each row.
        predicted: the predicted score of each row.

    Returns:
        The scores.

    Raises:
        ValueError: an input is empty, not 1-D or not finite, or the lengths differ.
    """
    y = _vector(truth, "truth")
    p = _vector(predicted, "predicted")
    if len(y) != len(p):
        raise ValueError(
            f"truth has {len(y)} rows but predicted has {len(p)}; pass one prediction per row"
        )
    error = p - y
    # A constant truth has no spread to explain (its float mean may not equal its values).
    deviation = np.zeros_like(y) if np.ptp(y) == 0 else y - y.mean()
    # One common scale for the squares (scale-free ratios, no overflow on huge values).
    scale = max(float(np.abs(error).max()), float(np.abs(deviation).max()))
    if scale == 0:
        rmse, r2 = 0.0, 0.0
    else:
        sse = float(np.square(error / scale).sum())
        sst = float(np.square(deviation / scale).sum())
        rmse = scale * float(np.sqrt(sse / len(y)))
        r2 = 0.0 if sst == 0 else 1.0 - sse / sst
    return RegressionScores(
        rmse=rmse,
        mae=float(np.abs(error).mean()),
        r2=r2,
        pearson=_pearson(y, p),
        spearman=_pearson(average_ranks(y), average_ranks(p)),
        rows=len(y),
    )
