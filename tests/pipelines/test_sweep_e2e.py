"""The strategy-sweep DAG through `transferkit run`: parallel branches on real SST-2 rows,
the comparison report, parent/child MLflow runs, and the negative-transfer guard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.pipelines.test_pipeline_e2e import transferkit

pytestmark = pytest.mark.slow


def write_config(folder: Path, sst2_small: dict[str, Path], margin: float) -> Path:
    config = {
        "data": {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "text_column": "sentence",
            "label_names": {0: "negative", 1: "positive"},
            "max_rows": 600,
        },
        "training": {"batch_size": 16, "precision": "bf16"},
        "sweep": {
            "branches": [
                {"strategy": {"name": "linear_probe"}},
                {
                    "strategy": {
                        "name": "zero_shot",
                        "templates": ["it was {}."],
                        "label_texts": {"negative": ["terrible"], "positive": ["great"]},
                    }
                },
                {"strategy": {"name": "scratch"}, "training": {"max_steps": 2}},
            ],
            "examples_per_class": [16],
            "margin": margin,
        },
        "registry": {"model_name": "sst2-sweep"},
        "runtime": {"work_dir": str(folder / "work")},
    }
    path = folder / f"sweep-{margin}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, sst2_small: dict[str, Path]) -> dict:
    """A sweep whose margin no branch can clear: every transfer branch is flagged."""
    folder = tmp_path_factory.mktemp("sweep")
    config = write_config(folder, sst2_small, margin=0.9)
    result = transferkit("run", str(config), "--summary", str(folder / "guarded.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((folder / "guarded.json").read_text())
    summary["stdout"], summary["folder"] = result.stdout, folder
    summary["stderr"] = result.stderr
    return summary


def test_sweep_runs_every_branch_and_reports_them(guarded: dict) -> None:
    sweep = guarded["sweep"]
    rows = {row["name"]: row for row in sweep["branches"]}
    assert list(rows) == ["linear_probe@16", "zero_shot@0", "scratch@16"]
    assert rows["linear_probe@16"]["labelled_examples"] == 32
    assert rows["zero_shot@0"]["labelled_examples"] == 0
    assert rows["zero_shot@0"]["trainable_parameters"] == 0
    # Transfer from the pre-trained encoder beats a random encoder given 2 steps on 32 rows.
    assert rows["linear_probe@16"]["test"] > rows["scratch@16"]["test"] + 0.05
    assert all(row["scores"]["rows"] == 300 for row in rows.values())
    report = Path(sweep["report"])
    assert "data:image/png;base64," in report.read_text()
    assert (report.parent / "learning_curve.png").stat().st_size > 1000
    assert "Sweep (3 branches; accuracy; margin 0.9)" in guarded["stdout"]
    assert set(guarded["step_seconds"]) >= {"plan_sweep", "compare_strategies"}
    # The step table counts the branches as they run.
    for step in ("train", "evaluate"):
        for number in (1, 2, 3):
            assert re.search(rf"✓ {step} #{number}/3 +[\d.]+ s\n", guarded["stderr"])


def test_negative_transfer_is_flagged_tagged_and_never_promoted(guarded: dict) -> None:
    sweep = guarded["sweep"]
    assert sorted(sweep["negative_transfer"]) == ["linear_probe@16", "zero_shot@0"]
    assert guarded["champion"] is False
    assert guarded["champion_reason"].startswith("negative transfer: ")
    client = MlflowClient(
        tracking_uri=guarded["tracking_uri"], registry_uri=guarded["tracking_uri"]
    )
    version = client.get_model_version("sst2-sweep", guarded["version"])
    assert version.tags["transferkit.negative_transfer"] == "true"
    assert version.tags["transferkit.sweep_branch"] == sweep["selected"]
    assert "champion" not in client.get_registered_model("sst2-sweep").aliases


def test_each_branch_is_a_child_run_of_one_parent(guarded: dict) -> None:
    client = MlflowClient(
        tracking_uri=guarded["tracking_uri"], registry_uri=guarded["tracking_uri"]
    )
    experiment = client.get_experiment_by_name("transferkit")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("transferkit.sweep") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == guarded["sweep_run_id"]
    # The parent is the pipeline run's own, opened by the first step (with the sweep's
    # config as params) and ended by the exit step.
    assert parent.data.tags["transferkit.run_role"] == "pipeline"
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.parallelism"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [
        "linear_probe@16",
        "scratch@16",
        "zero_shot@0",
    ]
    # Test accuracy on 300 GLUE dev rows (about half of each label), measured on this
    # project's CPU: the probe on 32 examples 0.700 and the zero-shot prompts 0.683, well above
    # chance; the random encoder after 2 steps stays at chance (0.517).
    bounds = {"linear_probe@16": (0.65, 1.0), "zero_shot@0": (0.63, 1.0), "scratch@16": (0.4, 0.6)}
    for child in children:
        low, high = bounds[child.info.run_name]
        assert low <= child.data.metrics["test_accuracy"] <= high, child.info.run_name
        assert child.data.params["training.examples_per_class"] in ("16", "")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert "sweep/report.html" in artifacts
    assert "sweep/comparison.json" in artifacts


def test_a_sweep_that_clears_the_guard_promotes_its_selection(
    guarded: dict, sst2_small: dict[str, Path]
) -> None:
    folder = guarded["folder"]
    config = write_config(folder, sst2_small, margin=0.0)
    result = transferkit("run", str(config), "--summary", str(folder / "clear.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((folder / "clear.json").read_text())
    selected = next(r for r in summary["sweep"]["branches"] if r["selected"])
    assert selected["negative_transfer"] is False
    assert summary["champion"] is True
