"""Multi-label scores and thresholds, checked against scikit-learn's implementations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from transferkit.multilabel import score_sets, sigmoid, tune_thresholds
from transferkit.ranks import average_precision


def _problem(rows: int = 400, labels: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.random((rows, labels)) < np.linspace(0.05, 0.5, labels)
    noise = rng.normal(0, 1.0, (rows, labels))
    proba = sigmoid(2.0 * (truth.astype(float) - 0.5) * 2 + noise)
    return truth, proba


def test_scores_match_scikit_learn() -> None:
    truth, proba = _problem()
    truth[:, 5] = False  # a label no row carries
    predicted = proba >= 0.5
    predicted[:, 5] = False  # and none predicted: F1 0, counted in the macro mean
    names = [f"l{j}" for j in range(6)]
    s = score_sets(truth, predicted, proba, names)
    assert s.micro_f1 == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert s.macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert s.samples_f1 == pytest.approx(
        f1_score(truth, predicted, average="samples", zero_division=1)
    )
    assert s.subset_accuracy == pytest.approx(float((truth == predicted).all(axis=1).mean()))
    assert s.hamming_loss == pytest.approx(hamming_loss(truth, predicted))
    for j in range(5):
        label = s.per_label[names[j]]
        assert label.precision == pytest.approx(
            precision_score(truth[:, j], predicted[:, j], zero_division=0)
        )
        assert label.recall == pytest.approx(recall_score(truth[:, j], predicted[:, j]))
        assert label.roc_auc == pytest.approx(roc_auc_score(truth[:, j], proba[:, j]))
        assert label.average_precision == pytest.approx(
            average_precision_score(truth[:, j], proba[:, j])
        )
        assert label.support == int(truth[:, j].sum())
    assert s.mean_average_precision == pytest.approx(
        np.mean([s.per_label[n].average_precision for n in names])
    )


def test_average_precision_with_ties_matches_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    positive = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + positive * 0.3, 1)  # many tied scores
    assert average_precision(positive, scores) == pytest.approx(
        average_precision_score(positive, scores)
    )
    assert average_precision(np.zeros(5, dtype=bool), np.arange(5.0)) == 0.0


def test_per_label_thresholds_maximise_each_label_f1() -> None:
    truth, proba = _problem(rows=600, seed=1)
    cuts = tune_thresholds(truth, proba, "per_label", "macro_f1")
    for j in range(truth.shape[1]):
        best = f1_score(truth[:, j], proba[:, j] >= cuts[j])
        # No threshold on a fine grid does better than the chosen one.
        for cut in np.linspace(0.01, 0.99, 99):
            assert f1_score(truth[:, j], proba[:, j] >= cut, zero_division=0) <= best + 1e-12
    tuned = score_sets(truth, proba >= cuts, proba, list("abcdef")).macro_f1
    assert tuned >= score_sets(truth, proba >= 0.5, proba, list("abcdef")).macro_f1


def test_a_global_threshold_is_one_cut_for_every_label() -> None:
    truth, proba = _problem(rows=600, seed=2)
    cuts = tune_thresholds(truth, proba, "global", "micro_f1")
    assert len(set(cuts.tolist())) == 1
    chosen = f1_score(truth, proba >= cuts[0], average="micro")
    for cut in np.linspace(0.05, 0.95, 19):
        assert f1_score(truth, proba >= cut, average="micro") <= chosen + 1e-12
    # Ranking metrics do not depend on a threshold: 0.5 is kept.
    assert set(tune_thresholds(truth, proba, "global", "mean_average_precision")) == {0.5}


def test_sigmoid_is_stable_for_extreme_logits() -> None:
    out = sigmoid(np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0]))
    assert np.isfinite(out).all()
    assert (out[0], out[2], out[-1]) == (0.0, 0.5, 1.0)
    assert out[1] == pytest.approx(1 / (1 + np.e))


@pytest.mark.parametrize(
    "metric",
    ["macro_f1", "micro_f1", "samples_f1", "subset_accuracy", "mean_average_precision", "roc_auc"],
)
def test_the_one_metric_path_agrees_with_the_full_scores(metric: str) -> None:
    from transferkit.multilabel import set_metric

    truth, proba = _problem(rows=300, seed=4)
    predicted = proba >= 0.4
    full = score_sets(truth, predicted, proba, list("abcdef")).metric(metric)
    assert set_metric(truth, predicted, proba, metric) == pytest.approx(full)
