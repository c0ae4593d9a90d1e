"""Regression metrics (transferkit.regression), average ranks and the ridge head
(transferkit.training.ridge) against hand-computed values, scipy and closed-form solutions."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from transferkit.config import LinearProbeConfig
from transferkit.ranks import average_ranks, roc_auc
from transferkit.regression import (
    LOWER_IS_BETTER,
    METRICS,
    RegressionScores,
    score_regression,
)
from transferkit.training.ridge import RidgeFit, fit_ridge

DEFAULT_ALPHAS = LinearProbeConfig().ridge_alphas  # strategy.ridge_alphas' default

# --- average ranks ------------------------------------------------------------------------


def test_average_ranks_share_the_mean_rank_over_ties() -> None:
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert average_ranks(np.array([5, 5, 5])).tolist() == [2.0, 2.0, 2.0]
    assert average_ranks(np.array([])).tolist() == []
    values = np.random.default_rng(0).integers(0, 7, size=200)
    np.testing.assert_array_equal(average_ranks(values), stats.rankdata(values))


def test_average_ranks_refuse_a_matrix() -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*1-D"):
        average_ranks(np.zeros((2, 2)))


def test_roc_auc_still_counts_ties_half() -> None:
    positive = np.array([True, False, True, False])
    assert roc_auc(positive, np.array([0.9, 0.1, 0.5, 0.5])) == pytest.approx(0.875)
    assert roc_auc(positive, np.array([1.0, 1.0, 1.0, 1.0])) == 0.5
    assert roc_auc(np.array([True, True]), np.array([0.1, 0.2])) == 0.5


# --- regression metrics -------------------------------------------------------------------


def test_hand_computed_metrics() -> None:
    # errors [0, 0, 0, 1]; truth mean 2.5, SST 5; prediction mean 2.75, its SS 8.75,
    # cross products 6.5; the prediction orders the rows exactly as the truth does.
    s = score_regression(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0]))
    assert s.rmse == pytest.approx(0.5)
    assert s.mae == pytest.approx(0.25)
    assert s.r2 == pytest.approx(0.8)
    assert s.pearson == pytest.approx(6.5 / math.sqrt(5 * 8.75))
    assert s.spearman == pytest.approx(1.0)
    assert s.rows == 4


def test_metrics_agree_with_scipy_with_ties() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 6, size=300).astype(float)  # STS-like: many ties
    predicted = np.round(truth + rng.normal(0, 1.2, size=300))  # ties on this side too
    s = score_regression(truth, predicted)
    assert s.pearson == pytest.approx(stats.pearsonr(truth, predicted)[0], abs=1e-12)
    assert s.spearman == pytest.approx(stats.spearmanr(truth, predicted)[0], abs=1e-12)
    error = predicted - truth
    assert s.rmse == pytest.approx(math.sqrt(np.mean(error**2)), rel=1e-12)
    assert s.mae == pytest.approx(np.mean(np.abs(error)), rel=1e-12)
    sst = np.sum((truth - truth.mean()) ** 2)
    assert s.r2 == pytest.approx(1 - np.sum(error**2) / sst, rel=1e-12)
    assert -1 < s.r2 < 1
    assert 0.5 < s.spearman < 1


def test_anticorrelated_and_perfect() -> None:
    truth = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    s = score_regression(truth, -truth)
    assert s.pearson == pytest.approx(-1.0)
    assert s.spearman == pytest.approx(-1.0)
    perfect = score_regression(truth, truth.copy())
    assert (perfect.rmse, perfect.mae, perfect.r2) == (0.0, 0.0, 1.0)
    assert perfect.pearson == pytest.approx(1.0)


def test_constant_inputs_give_zero_correlations_not_nan() -> None:
    truth = np.array([0.1, 0.1, 0.1])  # its float mean is not exactly 0.1
    s = score_regression(truth, np.array([0.0, 1.0, 2.0]))
    assert (s.pearson, s.spearman, s.r2) == (0.0, 0.0, 0.0)
    assert s.mae == pytest.approx((0.1 + 0.9 + 1.9) / 3)
    s = score_regression(np.array([1.0, 2.0, 3.0]), np.full(3, 2.0))
    assert (s.pearson, s.spearman) == (0.0, 0.0)
    assert s.r2 == pytest.approx(0.0)  # the mean predicted: nothing explained
    assert s.rmse == pytest.approx(math.sqrt(2 / 3))
    one = score_regression(np.array([4.0]), np.array([3.0]))
    assert (one.rmse, one.r2, one.pearson, one.spearman) == (1.0, 0.0, 0.0, 0.0)
    assert all(math.isfinite(v) for v in one.model_dump().values())


def test_huge_values_do_not_overflow() -> None:
    truth = np.array([1e200, 2e200, 3e200])
    s = score_regression(truth, truth * 1.1)
    assert s.pearson == pytest.approx(1.0)
    assert math.isfinite(s.rmse)
    assert math.isfinite(s.r2)
    assert s.rmse == pytest.approx(1e199 * math.sqrt(14 / 3))


def test_orientation_makes_higher_better() -> None:
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    good, bad = np.array([1.1, 2.0, 3.0, 4.0]), np.array([2.0, 1.0, 4.0, 3.0])
    for name in METRICS:
        better = score_regression(truth, good).oriented(name)
        assert better > score_regression(truth, bad).oriented(name), name
    s = score_regression(truth, bad)
    assert s.oriented("rmse") == -s.rmse == -1.0
    assert s.oriented("mae") == -s.mae
    assert s.oriented("r2") == s.r2 == s.metric("r2")
    assert s.oriented("spearman") == s.spearman
    assert frozenset({"rmse", "mae"}) == LOWER_IS_BETTER


def test_unknown_metric_is_refused_naming_the_valid_ones() -> None:
    s = RegressionScores(rmse=1, mae=1, r2=0, pearson=0, spearman=0, rows=1)
    for call in (lambda: s.metric("accuracy"), lambda: s.oriented("rows")):
        with pytest.raises(ValueError, match="use one of rmse, mae, r2, pearson, spearman") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'macro_f1'"):
        score_regression(np.ones(2), np.ones(2)).oriented("macro_f1")


@pytest.mark.parametrize(
    ("truth", "predicted", "message"),
    [
        ([], [], "truth is empty"),
        ([1.0, 2.0], [1.0], "truth has 2 rows but predicted has 1"),
        ([1.0, math.nan], [1.0, 2.0], r"truth has 1 non-finite value\(s\) \(first at row 1"),
        ([1.0, 2.0], [math.inf, 2.0], "predicted has 1 non-finite"),
        ([[1.0, 2.0]], [[1.0, 2.0]], r"truth has shape \(1, 2\)"),
    ],
)
def test_bad_inputs_are_refused_in_one_line(truth: list, predicted: list, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        score_regression(np.array(truth), np.array(predicted))
    assert "\n" not in str(e.value)


# --- ridge --------------------------------------------------------------------------------


def _closed_form(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Weights and intercept for raw features: least squares on [X_std 1; sqrt(alpha) I 0]."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    z = (x - mean) / std
    rows, dims = x.shape
    a = np.block([[z, np.ones((rows, 1))], [math.sqrt(alpha) * np.eye(dims), np.zeros((dims, 1))]])
    solution = np.linalg.lstsq(a, np.r_[y, np.zeros(dims)], rcond=None)[0]
    weight = solution[:dims] / std
    return weight, float(solution[dims] - weight @ mean)


def _head(head: torch.nn.Linear) -> tuple[np.ndarray, float]:
    return head.weight.detach().double().numpy()[0], float(head.bias.detach().double())


def _data(
    rows: int, dims: int, seed: int, scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Shifted, unevenly scaled columns: the standardisation and its folding matter.
    x = rng.normal(size=(rows, dims)) * rng.uniform(0.5, scale, size=dims) + rng.normal(size=dims)
    beta = rng.normal(size=dims)
    y = x @ beta + 2.0 + rng.normal(0, 0.5, size=rows)
    return x.astype(np.float32), y, beta


@pytest.mark.parametrize(("rows", "dims"), [(300, 40), (30, 80)])  # eigh, and SVD (rows < dims)
def test_ridge_equals_the_closed_form_solution(rows: int, dims: int) -> None:
    x, y, _ = _data(rows, dims, seed=2)
    alpha = 5.0
    head, fit = fit_ridge(x, y, x[:10], y[:10], [alpha], "rmse")
    weight, bias = _head(head)
    expected_weight, expected_bias = _closed_form(x.astype(np.float64), y, alpha)
    assert np.linalg.norm(weight - expected_weight) / np.linalg.norm(expected_weight) < 1e-6
    assert bias == pytest.approx(expected_bias, rel=1e-6, abs=1e-6)
    assert head.weight.dtype == torch.float32
    assert head.weight.shape == (1, dims)
    assert fit.alpha == alpha
    assert list(fit.grid) == ["5"]
    # The folded head on raw features predicts what the standardised model predicts.
    x64 = x.astype(np.float64)
    mean, std = x64.mean(axis=0), x64.std(axis=0)
    standardised_weight = expected_weight * std
    expected = (x64 - mean) / std @ standardised_weight + (expected_bias + expected_weight @ mean)
    with torch.no_grad():
        predicted = head(torch.from_numpy(x)).double().numpy()[:, 0]
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-4)
    assert fit.validation_metric == pytest.approx(
        score_regression(y[:10], predicted[:10]).rmse, rel=1e-4
    )


def test_ridge_recovers_a_linear_function_and_logs_each_alpha(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, y, beta = _data(1500, 30, seed=3)
    with caplog.at_level(logging.INFO, logger="transferkit.training.ridge"):
        head, fit = fit_ridge(x[:1000], y[:1000], x[1000:], y[1000:], DEFAULT_ALPHAS, "r2")
    assert fit.validation_metric > 0.95
    assert fit.validation_metric == max(fit.grid.values()) == fit.grid[f"{fit.alpha:g}"]
    assert list(fit.grid) == ["100000", "10000", "1000", "100", "10", "1", "0.1"]
    assert fit.alpha <= 10
    weight, bias = _head(head)
    np.testing.assert_allclose(weight, beta, atol=0.05)
    assert bias == pytest.approx(2.0, abs=0.2)
    logged = [r.getMessage() for r in caplog.records]
    assert "ridge alpha=100000: validation r2" in logged[0]
    assert len(logged) == 7


def _selected_alpha(noise_dims: int, seed: int) -> float:
    """The penalty chosen with 80 features of which ``noise_dims`` carry no signal, on 100
    training rows: few rows per dimension, so the noise features' fitted weights cost."""
    rng = np.random.default_rng(seed)
    rows, dims = 100, 80
    x = rng.normal(size=(rows + 1000, dims))
    beta = np.zeros(dims)
    beta[noise_dims:] = rng.normal(size=dims - noise_dims)
    y = x @ beta + rng.normal(0, 2.0, size=len(x))
    alphas = np.logspace(-2, 4, 25).tolist()
    _, fit = fit_ridge(x[:rows], y[:rows], x[rows:], y[rows:], alphas, "rmse")
    assert fit.validation_metric == min(fit.grid.values())  # raw rmse: the lowest wins
    return fit.alpha


def test_ridge_picks_a_stronger_penalty_when_most_features_are_noise() -> None:
    for seed in (0, 1):  # seeds 0–7 all give a ratio of 3 or more (5.6–56)
        assert _selected_alpha(noise_dims=75, seed=seed) > 3 * _selected_alpha(0, seed=seed)


def test_ridge_ties_go_to_the_stronger_penalty() -> None:
    # Constant features: every penalty predicts the training mean, so all tie.
    x = np.ones((20, 3), dtype=np.float32)
    y = np.arange(20.0)
    head, fit = fit_ridge(x, y, x[:5], y[:5] + 1, [0.1, 10.0, 1.0], "mae")
    assert fit.alpha == 10.0
    assert len(set(fit.grid.values())) == 1
    weight, bias = _head(head)
    assert np.all(weight == 0)
    assert bias == pytest.approx(9.5)


def test_ridge_without_penalty_is_least_squares_and_keeps_inputs_unless_told() -> None:
    x, y, _ = _data(100, 5, seed=6)
    original = x.copy()
    head, _ = fit_ridge(x, y, x, y, [0.0], "pearson")
    expected_weight, expected_bias = _closed_form(x.astype(np.float64), y, 0.0)
    weight, bias = _head(head)
    np.testing.assert_allclose(weight, expected_weight, rtol=1e-5)
    assert bias == pytest.approx(expected_bias, rel=1e-5)
    np.testing.assert_array_equal(x, original)
    fit_ridge(x, y, x[:5].copy(), y[:5], [1.0], "pearson", overwrite=True)
    assert not np.array_equal(x, original)  # standardised in place, as allowed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"alphas": []}, "alphas is empty"),
        ({"alphas": [1.0, -1.0]}, "negative or non-finite"),
        ({"primary_metric": "accuracy"}, "unknown regression metric 'accuracy'"),
        ({"train_y": np.r_[np.nan, np.zeros(9)]}, r"train_y has 1 non-finite value\(s\)"),
        ({"val_y": np.r_[np.zeros(4), np.inf]}, "val_y has 1 non-finite"),
        ({"train_y": np.zeros(9)}, "train_y has 9 rows but train_x has 10"),
        ({"val_y": np.zeros(6)}, "val_y has 6 rows but val_x has 5"),
        ({"val_x": np.zeros((5, 2))}, "val_x has 2 dimensions but train_x has 3"),
        ({"train_x": np.zeros((0, 3)), "train_y": np.zeros(0)}, "both splits need rows"),
        ({"train_x": np.r_[np.full((1, 3), np.nan), np.ones((9, 3))]}, "train_x holds non-"),
    ],
)
def test_ridge_refuses_bad_inputs_in_one_line(change: dict, message: str) -> None:
    arguments = {
        "train_x": np.random.default_rng(7).normal(size=(10, 3)),
        "train_y": np.zeros(10),
        "val_x": np.ones((5, 3)),
        "val_y": np.zeros(5),
        "alphas": [1.0],
        "primary_metric": "rmse",
    } | change
    with pytest.raises(ValueError, match=message) as e:
        fit_ridge(**arguments)
    assert "\n" not in str(e.value)


def test_ridge_fit_record_round_trips() -> None:
    fit = RidgeFit(alpha=10.0, validation_metric=0.5, grid={"10": 0.5, "1": 0.4})
    assert RidgeFit.model_validate(fit.model_dump()) == fit
    assert list(DEFAULT_ALPHAS) == [10.0**k for k in range(-1, 6)]
