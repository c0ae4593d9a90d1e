"""task: multi_label through `transferkit run` (KFP local runner) on real GoEmotions rows and
MiniLM: label sets in, a linear probe with per-label thresholds, multi-label scores, and a
registered model that serves each text's label set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import read_goemotions

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ROWS, TEST_ROWS = 4000, 600  # every label of the test rows occurs in these (5 or more times)

pytestmark = [pytest.mark.slow, pytest.mark.tasks, pytest.mark.timeout(1800)]


def _goemotions(shared_data: Path, name: str, rows: int) -> pd.DataFrame:
    """The first rows of a GoEmotions file (no header: text, label ids, comment id) whose
    text has no double quote: written back as TSV, every text then reads back as it is, so
    that the test can give the served model the texts evaluation saw."""
    frame = read_goemotions(shared_data, name, rows + rows // 5)
    return frame[~frame["text"].str.contains('"')].head(rows).reset_index(drop=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    work = tmp_path_factory.mktemp("multi-label")
    train = _goemotions(shared_data, "train.tsv", TRAIN_ROWS)
    test = _goemotions(shared_data, "test.tsv", TEST_ROWS)
    for frame, name in ((train, "train.tsv"), (test, "test.tsv")):
        frame.to_csv(work / name, sep="\t", index=False, quoting=3, escapechar="\\")
    names = (shared_data / "goemotions" / "emotions.txt").read_text().split()
    config = {
        "task": "multi_label",
        "data": {
            "train_uri": str(work / "train.tsv"),
            "test_uri": str(work / "test.tsv"),
            "text_column": "text",
            "label_column": "labels",
            "label_names": {str(i): name for i, name in enumerate(names)},
        },
        "strategy": {"name": "linear_probe"},
        "registry": {"model_name": "goemotions-probe"},
        "runtime": {"work_dir": str(work / "runs")},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    script = Path(sys.executable).with_name("transferkit")
    done = subprocess.run(
        [str(script), "run", str(work / "config.yaml"), "--summary", str(work / "summary.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    summary.update(stdout=done.stdout, names=names, test=test)
    return summary


def test_label_sets_are_scored_as_sets(run: dict) -> None:
    scores = run["scores"]
    assert scores["rows"] == TEST_ROWS
    assert sorted(scores["per_label"]) == sorted(run["names"])
    # A frozen MiniLM probe on 4,000 comments: well above chance on the labels it can learn
    # (gratitude is the easiest), far from perfect on the set as a whole.
    assert 0.2 < scores["macro_f1"] < scores["micro_f1"] < 0.9
    assert scores["per_label"]["gratitude"]["f1"] > 0.7
    assert 0 < scores["hamming_loss"] < 0.1
    assert "macro-F1" in run["stdout"]
    assert "registered  models:/goemotions-probe/1" in run["stdout"]
    assert run["metrics"]["test_macro_f1"] == pytest.approx(scores["macro_f1"])


def test_the_served_model_returns_the_evaluated_label_sets(run: dict) -> None:
    mlflow.set_tracking_uri(run["tracking_uri"])
    mlflow.set_registry_uri(run["tracking_uri"])
    version = mlflow.MlflowClient().get_model_version_by_alias("goemotions-probe", "champion")
    card = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                f"runs:/{version.run_id}/model/artifacts/model/transferkit.json"
            )
        ).read_text()
    )
    thresholds = card["decision"]["thresholds"]
    assert card["multi_label"] is True
    assert len(thresholds) == 28
    assert len(set(thresholds)) > 1  # chosen per label on validation
    predictions = pd.read_parquet(
        mlflow.artifacts.download_artifacts(
            f"runs:/{version.run_id}/evaluation/predictions.parquet"
        )
    )
    model = mlflow.pyfunc.load_model("models:/goemotions-probe@champion")
    texts = run["test"]["text"].tolist()[:64]
    served = model.predict(pd.DataFrame({"text": texts}))
    labels = card["labels"]
    for row in range(len(texts)):
        evaluated = {labels[i] for i in np.asarray(predictions["predicted"].iloc[row])}
        assert set(served["labels"].iloc[row]) == evaluated, texts[row]
        chosen = [n for n in labels if served[f"p_{n}"].iloc[row] >= thresholds[labels.index(n)]]
        assert set(chosen) == evaluated
    thanks = model.predict(pd.DataFrame({"text": ["Thank you so much for your help!"]}))
    assert "gratitude" in list(thanks["labels"].iloc[0])
