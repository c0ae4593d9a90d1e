"""evaluate and the metrics behind it: exact scores, report, plot, predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from transferkit import storage
from transferkit.data import load_split
from transferkit.evaluation import evaluate
from transferkit.metrics import mcnemar_p, paired_comparison, score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_agree_with_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, size=500)
    predicted = np.where(rng.random(500) < 0.6, truth, rng.integers(0, 4, size=500))
    predicted[predicted == 3] = 2  # class 3 is never predicted: its precision is 0
    labels = ["a", "b", "c", "d"]
    scores = score(truth, predicted, labels)
    assert scores.accuracy == pytest.approx(accuracy_score(truth, predicted))
    assert scores.macro_f1 == pytest.approx(
        f1_score(truth, predicted, average="macro", labels=range(4), zero_division=0)
    )
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=range(4), zero_division=0
    )
    for i, name in enumerate(labels):
        cls = scores.per_class[name]
        assert (cls.precision, cls.recall, cls.f1, cls.support) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i])
        )
    assert scores.confusion_matrix == confusion_matrix(truth, predicted, labels=range(4)).tolist()
    assert scores.per_class["d"].precision == 0.0


def test_evaluate_writes_report_plot_and_predictions(tmp_path: Path, probe_run: tuple) -> None:
    config, artifacts, trained = probe_run
    out = tmp_path / "evaluation"
    result = evaluate(config, artifacts / "dataset", artifacts / "model", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png",
        "evaluation.json",
        "predictions.parquet",
        "report.md",
        "roc_curve.png",
    ]
    assert result.primary_metric == "accuracy"
    assert result.strategy == "linear_probe"
    assert result.scores.rows == 300
    assert result.primary_value == result.scores.accuracy > 0.75
    predictions = pd.read_parquet(out / "predictions.parquet")
    _, truth = load_split(artifacts / "dataset", "test")
    assert (predictions["label"].to_numpy() == truth).all()
    assert np.allclose(predictions[["p_negative", "p_positive"]].sum(axis=1), 1.0, atol=1e-5)
    assert (
        predictions["predicted"] == predictions[["p_negative", "p_positive"]].to_numpy().argmax(1)
    ).all()
    assert (predictions["predicted"] == truth).mean() == pytest.approx(result.scores.accuracy)
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "roc_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Binary task: ROC-AUC from the probabilities, sensitivity/specificity of 'positive'.
    assert result.scores.positive_label == "positive"
    assert result.scores.roc_auc > result.scores.accuracy - 0.05
    positive = truth == 1
    assert result.scores.sensitivity == pytest.approx(
        (predictions["predicted"][positive] == 1).mean()
    )
    assert result.scores.specificity == pytest.approx(
        (predictions["predicted"][~positive] == 0).mean()
    )
    report = (out / "report.md").read_text()
    assert f"**accuracy: {result.primary_value:.4f}** on 300 evaluation rows" in report
    assert "| negative |" in report
    assert "| positive |" in report
    assert f"{trained.validation_metric:.4f}" in report
    recorded = storage.read_json(out / "evaluation.json")
    assert recorded["scores"]["confusion_matrix"] == result.scores.confusion_matrix
    kfp = result.kfp_metrics()
    assert set(kfp) == {
        "accuracy",
        "macro_f1",
        "balanced_accuracy",
        "roc_auc",
        "sensitivity",
        "specificity",
        "precision_negative",
        "recall_negative",
        "f1_negative",
        "precision_positive",
        "recall_positive",
        "f1_positive",
    }


@pytest.mark.parametrize(("challenger_only", "champion_only"), [(10, 3), (3, 10), (0, 0), (40, 25)])
def test_mcnemar_is_the_exact_one_sided_binomial_test(
    challenger_only: int, champion_only: int
) -> None:
    from scipy.stats import binomtest

    n = challenger_only + champion_only
    expected = binomtest(challenger_only, n, 0.5, alternative="greater").pvalue if n else 1.0
    assert mcnemar_p(challenger_only, champion_only) == pytest.approx(expected)


def synthetic_pair(fixes: int, breaks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1,000 rows; the champion is right on 80 %; the challenger fixes and breaks some rows."""
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 1000)
    champion = truth.copy()
    wrong = rng.choice(1000, 200, replace=False)
    champion[wrong] = 1 - champion[wrong]
    challenger = champion.copy()
    challenger[wrong[:fixes]] = truth[wrong[:fixes]]
    right = np.setdiff1d(np.arange(1000), wrong)[:breaks]
    challenger[right] = 1 - truth[right]
    return truth, challenger, champion


def test_paired_comparison_mcnemar_and_bootstrap_agree() -> None:
    truth, challenger, champion = synthetic_pair(fixes=30, breaks=10)
    labels = ["a", "b"]
    exact = paired_comparison(truth, challenger, champion, labels, "accuracy", "mcnemar", 0.05)
    assert (exact.challenger_only_right, exact.champion_only_right) == (30, 10)
    assert exact.gain == pytest.approx(0.02)
    assert exact.p_value == pytest.approx(mcnemar_p(30, 10))
    assert exact.p_value < 0.01
    assert exact.ci_low < 0.02 < exact.ci_high
    assert exact.ci_level == pytest.approx(0.9)
    boot = paired_comparison(
        truth, challenger, champion, labels, "accuracy", "bootstrap", 0.05, samples=500, seed=1
    )
    assert boot.p_value < 0.01
    assert boot.ci_low > 0
    again = paired_comparison(
        truth, challenger, champion, labels, "accuracy", "bootstrap", 0.05, samples=500, seed=1
    )
    assert again == boot  # seeded: reproducible
    same = paired_comparison(
        truth, champion, champion, labels, "macro_f1", "bootstrap", 0.05, samples=200
    )
    assert (same.gain, same.p_value) == (0.0, 1.0)


def test_promotion_decision() -> None:
    from transferkit.config import PipelineConfig
    from transferkit.registry import decide

    config = PipelineConfig.model_validate({"data": {"train_uri": "t", "test_uri": "d"}})
    truth, challenger, champion = synthetic_pair(fixes=6, breaks=3)
    small = paired_comparison(truth, challenger, champion, ["a", "b"], "accuracy", "mcnemar", 0.05)
    promote, reason = decide(small, "4", config)
    assert not promote
    assert reason.startswith(
        "accuracy 0.8030 vs champion v4 0.8000 on the same 1000 rows (gain +0.0030; mcnemar p=0.254"
    )
    assert reason.endswith("not significant at 0.05")
    config.registry.gate = "none"
    promote, reason = decide(small, "4", config)
    assert promote
    assert reason == "accuracy 0.8030 vs champion v4 0.8000 on the same 1000 rows (gain +0.0030)"
