"""Strategy sweeps of the other tasks through `transferkit run` (KFP local runner): scores of
real STS-B pairs judged by RMSE (lower is better: selection, the negative-transfer guard and
promotion all follow the error's direction) and label sets of real GoEmotions comments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_goemotions, stsb_subset
from tests.pipelines.test_regression_e2e import _run as run_config

pytestmark = [pytest.mark.slow, pytest.mark.tasks, pytest.mark.timeout(1800)]


def _run(work: Path, config: dict[str, Any]) -> dict[str, Any]:
    config["runtime"] = {"work_dir": str(work / "runs")}
    return run_config(work, config, "sweep")


def test_a_sweep_of_scores_selects_guards_and_promotes_by_the_falling_error(
    tmp_path: Path, shared_data: Path
) -> None:
    data = stsb_subset(tmp_path, shared_data, {"train": 600, "validation": 200, "test": 300})
    summary = _run(
        tmp_path,
        {
            "task": "regression",
            "data": data,
            "evaluation": {"primary_metric": "rmse"},
            "training": {"batch_size": 16},
            "sweep": {
                "branches": [
                    {"strategy": {"name": "linear_probe"}},
                    {"strategy": {"name": "zero_shot"}},
                    {"strategy": {"name": "scratch"}, "training": {"max_steps": 20}},
                ],
                "margin": 0.01,
            },
            "registry": {"model_name": "stsb-sweep"},
        },
    )
    sweep = summary["sweep"]
    rows = {row["name"]: row for row in sweep["branches"]}
    assert list(rows) == ["linear_probe@all", "zero_shot@0", "scratch@all"]
    # The lowest validation error is selected (the probe: a ridge on the pair features of the
    # pre-trained encoder, against an encoder trained from random for 20 steps).
    lowest = min(rows.values(), key=lambda row: row["validation"])
    assert sweep["selected"] == lowest["name"] == "linear_probe@all"
    scratch = rows["scratch@all"]
    for name in ("linear_probe@all", "zero_shot@0"):
        row = rows[name]  # the gain over scratch: its error minus ours
        assert row["delta_vs_scratch"] == pytest.approx(scratch["test"] - row["test"])
        assert row["negative_transfer"] is (row["delta_vs_scratch"] <= 0.01)
        assert row["scores"]["rows"] == 300
    assert rows["linear_probe@all"]["test"] < scratch["test"] - 0.05
    assert rows["linear_probe@all"]["negative_transfer"] is False
    assert summary["scores"]["rmse"] == pytest.approx(rows["linear_probe@all"]["test"])
    assert summary["champion"] is True
    assert "Sweep (3 branches; rmse; margin 0.01)" in summary["stdout"]
    report = (Path(sweep["report"]).parent / "report.md").read_text()
    assert "| evaluation rmse | Spearman |" in report


def test_a_sweep_of_label_sets_trains_registers_and_reports_every_branch(
    tmp_path: Path, shared_data: Path
) -> None:
    for name, rows in (("train.tsv", 1500), ("test.tsv", 400)):
        frame = read_goemotions(shared_data, name, rows)
        frame = frame[~frame["text"].str.contains('"')]
        frame.to_csv(tmp_path / name, sep="\t", index=False, quoting=3, escapechar="\\")
    summary = _run(
        tmp_path,
        {
            "task": "multi_label",
            "data": {
                "train_uri": str(tmp_path / "train.tsv"),
                "test_uri": str(tmp_path / "test.tsv"),
                "text_column": "text",
                "label_column": "labels",
            },
            "training": {"batch_size": 16},
            "sweep": {
                "branches": [
                    {"strategy": {"name": "linear_probe"}},
                    {"strategy": {"name": "scratch"}, "training": {"max_steps": 10}},
                ],
            },
            "registry": {"model_name": "goemotions-sweep"},
        },
    )
    sweep = summary["sweep"]
    rows = {row["name"]: row for row in sweep["branches"]}
    assert list(rows) == ["linear_probe@all", "scratch@all"]
    assert sweep["primary_metric"] == "macro_f1"
    assert sweep["selected"] == "linear_probe@all"
    probe, scratch = rows["linear_probe@all"], rows["scratch@all"]
    assert probe["delta_vs_scratch"] == pytest.approx(probe["test"] - scratch["test"])
    assert probe["test"] > scratch["test"] + 0.05
    assert probe["negative_transfer"] is False
    assert {"micro_f1", "samples_f1", "hamming_loss"} <= set(probe["scores"])
    assert summary["champion"] is True
    assert "Sweep (2 branches; macro_f1; margin 0.005)" in summary["stdout"]
