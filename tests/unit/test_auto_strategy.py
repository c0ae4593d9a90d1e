"""The `auto` strategy: escalate probe → partial → LoRA → full while validation gains enough."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_config, stsb_subset
from transferkit.config import load_config
from transferkit.errors import ConfigError
from transferkit.training import train
from transferkit.training.model import load_classifier


def auto_config(config, **strategy):  # type: ignore[no-untyped-def]
    training = config.training.model_copy(update={"max_steps": 12, "batch_size": 16})
    data = config.model_dump()
    data["training"] = training.model_dump()
    data["strategy"] = {"name": "auto", **strategy}
    return type(config).model_validate(data)


def test_auto_stops_when_a_rung_gains_too_little_and_keeps_the_cheapest(
    probe_run: tuple, tmp_path: Path
) -> None:
    config, folder, _ = probe_run
    config = auto_config(config, ladder=["linear_probe", "lora"], margin=1.0)
    result = train(config, folder / "dataset", folder / "backbone", folder / "features", tmp_path)
    details = result.details
    assert [rung["strategy"] for rung in details["ladder"]] == ["linear_probe", "lora"]
    assert "stopped escalating" in details["stopped"]
    # Within a margin of 1.0 of the best, the first (cheapest) rung wins.
    assert details["selected"] == "linear_probe"
    assert result.trainable_parameters == 770
    assert result.strategy == "auto"
    _, _, card = load_classifier(tmp_path)
    assert card.strategy == "auto"


def test_auto_escalates_past_a_weak_rung(probe_run: tuple, tmp_path: Path) -> None:
    config, folder, _ = probe_run
    # A probe crippled by a huge L2 penalty predicts one class: the next rung gains plenty.
    config = auto_config(
        config,
        ladder=["linear_probe", "partial_finetune", "lora"],
        linear_probe={"l2_grid": [1.0e6]},
        training={"lora": {"learning_rate": 5.0e-4}},
        margin=0.01,
    )
    result = train(config, folder / "dataset", folder / "backbone", folder / "features", tmp_path)
    ladder = result.details["ladder"]
    assert ladder[0]["validation_accuracy"] < 0.6
    assert ladder[1]["validation_accuracy"] > ladder[0]["validation_accuracy"] + 0.1
    assert len(ladder) == 3  # the gain of partial over the probe exceeded the margin
    assert result.details["selected"] != "linear_probe"
    best = max(rung["validation_accuracy"] for rung in ladder)
    assert result.validation_metric >= best - 0.01


def test_auto_on_scores_climbs_and_selects_by_the_error_falling(
    tmp_path: Path, shared_data: Path
) -> None:
    """task: regression judged by RMSE (lower is better) on real STS-B pairs: a rung gains
    when its error falls, and the rung kept is the one with the lowest error (margin 0)."""
    from transferkit.backbones import fetch_backbone
    from transferkit.data import ingest_data
    from transferkit.features import extract_features

    data = stsb_subset(tmp_path, shared_data, {"train": 240, "validation": 120, "test": 40})
    config = make_config(
        tmp_path,
        data,
        task="regression",
        evaluation={"primary_metric": "rmse"},
        strategy={
            "name": "auto",
            "ladder": ["linear_probe", "partial_finetune"],
            "margin": 0.0,
            "partial_finetune": {"train_top_layers": 1},
        },
        training={"max_steps": 15, "batch_size": 16, "learning_rate": 1e-4},
    )
    ingest_data(config, tmp_path / "dataset")
    fetch_backbone(config, tmp_path / "backbone")
    extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "features")
    result = train(
        config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "features", tmp_path / "m"
    )
    errors = {rung["strategy"]: rung["validation_rmse"] for rung in result.details["ladder"]}
    assert list(errors) == ["linear_probe", "partial_finetune"]
    assert errors["linear_probe"] != errors["partial_finetune"]
    lowest = min(errors, key=errors.__getitem__)
    assert result.details["selected"] == lowest
    assert result.validation_metric == errors[lowest]
    # The second rung reached the top when its error fell, else it stopped the climb.
    fell = errors["partial_finetune"] < errors["linear_probe"]
    assert ("stopped escalating" in result.details["stopped"]) is not fell
    _, _, card = load_classifier(tmp_path / "m")
    assert (card.strategy, card.regression) == ("auto", True)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("{name: auto, ladder: [lora, lora]}", "ladder repeats"),
        (
            "{name: auto, ladder: [lora], training: {full_finetune: {epochs: 1}}}",
            "not on the ladder",
        ),
        (
            "{name: auto, training: {lora: {learning_rate: 3}}}",
            "strategy.training.lora.learning_rate",
        ),
        ("{name: auto, ladder: [scratch]}", "ladder"),
    ],
)
def test_bad_auto_configs_are_rejected(tmp_path: Path, strategy: str, expected: str) -> None:
    path = tmp_path / "auto.yaml"
    path.write_text(f"data: {{train_uri: a.tsv, test_uri: b.tsv}}\nstrategy: {strategy}\n")
    with pytest.raises(ConfigError, match=expected):
        load_config(str(path), [])
