"""The same DAG on images: PneumoniaMNIST with the CIFAR-10 ResNet-20, via `transferkit run`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.pipelines.test_pipeline_e2e import transferkit

pytestmark = pytest.mark.slow


def test_pneumonia_probe_trains_evaluates_registers_and_serves_image_arrays(
    tmp_path: Path, shared_data: Path
) -> None:
    source = shared_data / "medmnist" / "pneumoniamnist.npz"
    summary_path = tmp_path / "summary.json"
    result = transferkit(
        "run",
        "examples/pneumonia.yaml",
        "--summary",
        str(summary_path),
        "--set",
        f"data.uri={source}",
        "--set",
        f"backbone.uri={shared_data / 'resnet20_cifar10' / 'resnet20-12fca82f.th'}",
        "--set",
        "sweep=",  # the example's strategy sweep off: the linear probe alone
        "--set",
        "data.max_rows=1500",  # of the 4,708 training images; official val/test kept whole
        "--set",
        f"runtime.work_dir={tmp_path / 'work'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    metrics, scores = summary["metrics"], summary["scores"]
    assert scores["rows"] == 624  # the official test split
    # Chance is 0.5 AUC; frozen CIFAR features already rank X-rays well above it.
    assert metrics["test_roc_auc"] > 0.85
    assert metrics["validation_roc_auc"] > 0.85
    assert scores["positive_label"] == "pneumonia"
    assert 0 <= metrics["test_specificity"] <= 1
    assert metrics["test_sensitivity"] > 0.8
    assert "ROC-AUC" in result.stdout
    assert "sensitivity" in result.stdout

    # The registered model loads through mlflow.pyfunc and predicts from an image array
    # what evaluate predicted for the same images: evaluation scores the served model (fp32),
    # so the probabilities agree to float noise and every label is the same.
    mlflow.set_tracking_uri(summary["tracking_uri"])
    mlflow.set_registry_uri(summary["tracking_uri"])
    model = mlflow.pyfunc.load_model(summary["champion_uri"])
    with np.load(source) as archive:
        images = archive["test_images"][:32, :, :, None]
    served = model.predict(images)
    assert list(served.columns) == ["label", "score", "p_normal", "p_pneumonia"]
    evaluated = pd.read_parquet(
        next(Path(summary["run_dir"]).rglob("evaluation/predictions.parquet"))
    )
    assert np.allclose(served["p_pneumonia"], evaluated["p_pneumonia"][:32], atol=1e-4)
    names = evaluated["predicted"][:32].map({0: "normal", 1: "pneumonia"})
    assert (served["label"] == names).all()
    artifacts = mlflow.artifacts.list_artifacts(
        run_id=model.metadata.run_id, artifact_path="evaluation"
    )
    assert "evaluation/roc_curve.png" in {a.path for a in artifacts}
