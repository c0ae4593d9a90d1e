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
from transferkit.metrics import score


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
        "precision_negative",
        "recall_negative",
        "f1_negative",
        "precision_positive",
        "recall_positive",
        "f1_positive",
    }
