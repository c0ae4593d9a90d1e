"""Sweeps: planning branches from a config, the label budget, comparison, selection, guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_config
from transferkit import storage
from transferkit.config import PipelineConfig, load_config
from transferkit.data import load_split
from transferkit.errors import ConfigError, TrainingError
from transferkit.sweep import compare, plan
from transferkit.training import budget_rows

DATA = {"train_uri": "train.tsv", "test_uri": "dev.tsv"}


def sweep_config(tmp_path: Path, **sweep: Any) -> PipelineConfig:
    sweep.setdefault(
        "branches",
        [
            {"strategy": {"name": "linear_probe"}},
            {"strategy": {"name": "zero_shot"}},
            {"strategy": {"name": "few_shot", "pair_iterations": 3}},
            {
                "strategy": {"name": "scratch"},
                "training": {"learning_rate": 5e-4, "epochs": 30, "max_steps": 2000},
            },
        ],
    )
    return make_config(tmp_path, DATA, training={"learning_rate": 1e-4}, sweep=sweep)


def test_plan_expands_budgets_and_strategies(tmp_path: Path) -> None:
    config = sweep_config(tmp_path, examples_per_class=[16, "all"])
    branches = plan(config)
    assert [b.name for b in branches] == [
        "linear_probe@16",
        "zero_shot@0",
        "few_shot@16",
        "scratch@16",
        "linear_probe@all",
        "scratch@all",
    ]
    by_name = {b.name: PipelineConfig.model_validate(b.config) for b in branches}
    assert all(c.sweep is None for c in by_name.values())
    assert by_name["linear_probe@16"].training.examples_per_class == 16
    assert by_name["linear_probe@all"].training.examples_per_class is None
    assert by_name["zero_shot@0"].training.examples_per_class is None
    few = by_name["few_shot@16"]
    assert few.strategy.name == "few_shot"
    assert few.training.examples_per_class == 16
    assert few.strategy.pair_iterations == 3
    # Branch overrides change only their branch; the rest keeps the top-level training.
    assert by_name["scratch@all"].training.learning_rate == 5e-4
    assert by_name["scratch@all"].training.max_steps == 2000
    assert by_name["linear_probe@all"].training.learning_rate == 1e-4
    assert by_name["scratch@16"].data == config.data


def test_plan_of_few_shot_alone_on_all_labels_is_an_error(tmp_path: Path) -> None:
    config = sweep_config(tmp_path, branches=[{"strategy": {"name": "few_shot"}}])
    with pytest.raises(TrainingError, match="plans no branch"):
        plan(config)


def write_yaml(tmp_path: Path, sweep: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"data: {{train_uri: train.tsv, test_uri: dev.tsv}}\nsweep:\n{sweep}")
    return path


def test_bad_branch_override_names_the_branch_and_key(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "  branches:\n    - strategy: {name: linear_probe}\n"
        "    - strategy: {name: scratch}\n      training: {learning_rate: 5}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [])
    message = str(info.value)
    assert "sweep.branches[1].training.learning_rate" in message
    assert "\n" not in message


def test_a_branch_cannot_ask_for_several_nodes(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "  branches:\n    - strategy: {name: linear_probe}\n"
        "    - strategy: {name: full_finetune}\n      training: {nodes: 2}\n",
    )
    with pytest.raises(ConfigError, match=r"sweep.branches\[1\].training.nodes: a sweep trains"):
        load_config(str(path), [])


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        (
            "  branches:\n    - strategy: {name: lora}\n    - strategy: {name: lora, rank: 4}\n",
            "give each a distinct 'label'",
        ),
        (
            "  branches:\n    - strategy: {name: lora}\n  examples_per_class: [16, 16]\n",
            "budgets repeat",
        ),
        ("  branches:\n    - strategy: {name: lora}\n  examples_per_class: [0]\n", "positive"),
        ("  branches:\n    - strategy: {name: lora}\n  examples_per_class: [most]\n", "nor 'all'"),
        ("  branches: []\n", "at least 1"),
    ],
)
def test_bad_sweeps_are_rejected(tmp_path: Path, sweep: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(str(write_yaml(tmp_path, sweep)), [])


def test_budget_rows_are_per_label_reproducible_and_keep_rare_labels(
    probe_run: tuple, tmp_path: Path
) -> None:
    config, folder, _ = probe_run
    labels = ["negative", "positive"]
    budgeted = config.model_copy(
        update={"training": config.training.model_copy(update={"examples_per_class": 20})}
    )
    rows = budget_rows(budgeted, folder / "dataset", labels)
    assert rows is not None
    _, truth = load_split(folder / "dataset", "train")
    assert np.bincount(truth[rows]).tolist() == [20, 20]
    assert np.array_equal(rows, budget_rows(budgeted, folder / "dataset", labels))
    assert budget_rows(config, folder / "dataset", labels) is None
    # A budget above a label's count takes every row of that label instead of failing.
    huge = budgeted.model_copy(
        update={"training": config.training.model_copy(update={"examples_per_class": 10**6})}
    )
    assert len(budget_rows(huge, folder / "dataset", labels)) == len(truth)


def fake_branch(
    root: Path,
    name: str,
    strategy: str,
    validation: float,
    test: float,
    trainable: int,
    cross_validated: float | None = None,
    scores: dict[str, float] | None = None,
) -> tuple[Path, Path]:
    """A branch's train and evaluate outputs as the steps write them (JSON parts only)."""
    model, evaluation = root / name / "model", root / name / "evaluation"
    model.mkdir(parents=True)
    evaluation.mkdir(parents=True)
    folds = None
    if cross_validated is not None:
        folds = {"metric": "accuracy", "folds": 5, "mean": cross_validated, "std": 0.02}
    storage.write_json(
        model / "training.json",
        {
            "strategy": strategy,
            "labelled_examples": 32,
            "trainable_parameters": trainable,
            "seconds": 1.5,
            "validation_metric": validation,
            "cross_validation": folds,
        },
    )
    (model / "weights.bin").write_bytes(name.encode())
    if scores is None:
        scores = {"accuracy": test, "macro_f1": test - 0.01}
    storage.write_json(evaluation / "evaluation.json", {"scores": {**scores, "rows": 100}})
    return model, evaluation


def run_compare(tmp_path: Path, outcomes: dict[str, tuple[float, ...]], margin: float) -> Any:
    config = sweep_config(
        tmp_path,
        branches=[
            {"strategy": {"name": "linear_probe"}},
            {"strategy": {"name": "full_finetune"}},
            {"strategy": {"name": "scratch"}},
        ],
        examples_per_class=[16],
        margin=margin,
    )
    sizes = {"linear_probe": 770, "full_finetune": 22_000_000, "scratch": 22_000_000}
    dirs = [
        fake_branch(tmp_path / "branches", s, s, *outcomes[s][:2], sizes[s], *outcomes[s][2:])
        for s in ("linear_probe", "full_finetune", "scratch")
    ]
    result, selected_config = compare(
        config,
        [m for m, _ in dirs],
        [e for _, e in dirs],
        tmp_path / "out" / "model",
        tmp_path / "out" / "evaluation",
    )
    return result, selected_config


def test_compare_selects_the_cheapest_branch_within_the_margin(tmp_path: Path) -> None:
    result, selected = run_compare(
        tmp_path,
        {"linear_probe": (0.80, 0.79), "full_finetune": (0.803, 0.85), "scratch": (0.6, 0.6)},
        margin=0.005,
    )
    assert result.selected == "linear_probe@16"
    assert "cheapest within 0.005" in result.reason
    assert PipelineConfig.model_validate(selected).strategy.name == "linear_probe"
    # The selected branch's own files travel on, with the comparison beside the evaluation.
    assert (tmp_path / "out" / "model" / "weights.bin").read_bytes() == b"linear_probe"
    sweep = tmp_path / "out" / "evaluation" / "sweep"
    for name in ("comparison.json", "report.md", "report.html", "learning_curve.png"):
        assert (sweep / name).stat().st_size > 0
    assert "data:image/png;base64," in (sweep / "report.html").read_text()
    assert "| linear_probe@16 |" in (sweep / "report.md").read_text()
    rows = {r.name: r for r in result.branches}
    assert rows["full_finetune@16"].delta_vs_scratch == pytest.approx(0.25)
    assert rows["scratch@16"].negative_transfer is None


def test_compare_prefers_the_best_branch_when_cheaper_ones_are_too_far(tmp_path: Path) -> None:
    result, _ = run_compare(
        tmp_path,
        {"linear_probe": (0.80, 0.79), "full_finetune": (0.86, 0.85), "scratch": (0.6, 0.6)},
        margin=0.005,
    )
    assert result.selected == "full_finetune@16"
    assert result.negative_transfer == []


def test_cross_validated_means_select_instead_of_the_validation_split(tmp_path: Path) -> None:
    # (validation, evaluation, cross-validated): the probe looks best on the small
    # validation split, the folds say scratch.
    result, selected = run_compare(
        tmp_path,
        {
            "linear_probe": (0.95, 0.80, 0.84),
            "full_finetune": (0.90, 0.81, 0.85),
            "scratch": (0.92, 0.86, 0.88),
        },
        margin=0.005,
    )
    assert result.selected == "scratch@16"
    assert result.reason == "scratch@16 has the best cross-validated metric (0.8800)"
    assert PipelineConfig.model_validate(selected).strategy.name == "scratch"
    assert "0.8800 ± 0.0200" in (tmp_path / "out/evaluation/sweep/report.md").read_text()


def test_a_sweep_with_cross_validated_and_plain_branches_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="some branches were cross-validated and some not"):
        run_compare(
            tmp_path,
            {
                "linear_probe": (0.95, 0.80, 0.84),
                "full_finetune": (0.90, 0.81),
                "scratch": (0.92, 0.86, 0.88),
            },
            margin=0.005,
        )


def test_guard_flags_transfer_that_does_not_beat_scratch(tmp_path: Path) -> None:
    result, _ = run_compare(
        tmp_path,
        {"linear_probe": (0.70, 0.61), "full_finetune": (0.62, 0.64), "scratch": (0.65, 0.605)},
        margin=0.01,
    )
    rows = {r.name: r for r in result.branches}
    # +0.005 over scratch is within the margin: negative transfer; +0.035 is a real gain.
    assert rows["linear_probe@16"].negative_transfer is True
    assert rows["full_finetune@16"].negative_transfer is False
    assert result.negative_transfer == ["linear_probe@16"]
    assert "Negative transfer" in (tmp_path / "out/evaluation/sweep/report.md").read_text()


def test_compare_refuses_artifacts_that_do_not_match_the_plan(tmp_path: Path) -> None:
    config = sweep_config(
        tmp_path,
        branches=[{"strategy": {"name": "linear_probe"}}, {"strategy": {"name": "scratch"}}],
        examples_per_class=[16],
    )
    probe = fake_branch(tmp_path, "a", "linear_probe", 0.8, 0.8, 770)
    swapped = fake_branch(tmp_path, "b", "full_finetune", 0.8, 0.8, 10)
    with pytest.raises(TrainingError, match="expected a scratch model"):
        compare(
            config, [probe[0], swapped[0]], [probe[1], swapped[1]], tmp_path / "m", tmp_path / "e"
        )
    with pytest.raises(TrainingError, match="planned 2 branches but got 1"):
        compare(config, [probe[0]], [probe[1]], tmp_path / "m", tmp_path / "e")
    assert not (tmp_path / "m").exists()
    assert not (tmp_path / "e").exists()


def test_a_sweep_of_scores_selects_and_guards_by_the_error_falling(tmp_path: Path) -> None:
    # task: regression judged by RMSE, lower is better: the fine-tune's error is the lowest
    # on validation, the probe's is 0.2 above it (outside the margin), and on the evaluation
    # split the probe's error is above scratch's (negative transfer) and the fine-tune's 0.08
    # below it (a gain).
    config = make_config(
        tmp_path,
        {**DATA, "text_pair_column": "sentence2"},
        task="regression",
        evaluation={"primary_metric": "rmse"},
        sweep={
            "branches": [
                {"strategy": {"name": s}} for s in ("linear_probe", "full_finetune", "scratch")
            ],
            "margin": 0.01,
        },
    )
    outcomes = {"linear_probe": (0.80, 0.82), "full_finetune": (0.60, 0.62), "scratch": (1.0, 0.70)}
    sizes = {"linear_probe": 1537, "full_finetune": 22_000_000, "scratch": 22_000_000}
    dirs = [
        fake_branch(
            tmp_path / "branches",
            name,
            name,
            *outcomes[name],
            sizes[name],
            scores={"rmse": outcomes[name][1], "spearman": 0.5},
        )
        for name in outcomes
    ]
    result, selected = compare(
        config, [m for m, _ in dirs], [e for _, e in dirs], tmp_path / "m", tmp_path / "e"
    )
    assert result.selected == "full_finetune@all"
    assert result.reason == "full_finetune@all has the best validation metric (0.6000)"
    assert PipelineConfig.model_validate(selected).task == "regression"
    rows = {r.name: r for r in result.branches}
    assert rows["full_finetune@all"].delta_vs_scratch == pytest.approx(0.08)
    assert rows["full_finetune@all"].negative_transfer is False
    assert rows["linear_probe@all"].delta_vs_scratch == pytest.approx(-0.12)
    assert result.negative_transfer == ["linear_probe@all"]
    report = (tmp_path / "e" / "sweep" / "report.md").read_text()
    assert "| evaluation rmse | Spearman |" in report  # RMSE judges; Spearman beside it
    # Within the margin the cheaper branch wins, in the error's direction too.
    outcomes["linear_probe"] = (0.605, 0.82)
    for name, (validation, _) in outcomes.items():
        path = tmp_path / "branches" / name / "model" / "training.json"
        storage.write_json(path, {**storage.read_json(path), "validation_metric": validation})
    result, _ = compare(
        config, [m for m, _ in dirs], [e for _, e in dirs], tmp_path / "m2", tmp_path / "e2"
    )
    assert result.selected == "linear_probe@all"
    assert "cheapest within 0.01 of the best, full_finetune@all (0.6000" in result.reason


@pytest.mark.parametrize("task", ["regression", "multi_label"])
def test_sweeps_auto_label_budgets_and_folds_take_every_task(tmp_path: Path, task: str) -> None:
    data = {**DATA, "text_pair_column": "sentence2"} if task == "regression" else DATA
    branches = [{"strategy": {"name": "linear_probe"}}, {"strategy": {"name": "scratch"}}]
    config = make_config(tmp_path, data, task=task, sweep={"branches": branches})
    planned = [PipelineConfig.model_validate(b.config) for b in plan(config)]
    assert [(c.task, c.strategy.name) for c in planned] == [
        (task, "linear_probe"),
        (task, "scratch"),
    ]
    auto = make_config(tmp_path, data, task=task, strategy={"name": "auto"})
    assert auto.strategy.name == "auto"
    budgets = make_config(
        tmp_path, data, task=task, sweep={"branches": branches, "examples_per_class": [8, "all"]}
    )
    planned = [PipelineConfig.model_validate(b.config) for b in plan(budgets)]
    assert [(c.strategy.name, c.training.examples_per_class) for c in planned] == [
        ("linear_probe", 8),
        ("scratch", 8),
        ("linear_probe", None),
        ("scratch", None),
    ]
    folds = make_config(
        tmp_path,
        data,
        task=task,
        sweep={"branches": branches},
        training={"cross_validation_folds": 3},
    )
    assert folds.training.cross_validation_folds == 3
    few_shot = {"branches": [{"strategy": {"name": "few_shot"}}], "examples_per_class": [8]}
    if task == "regression":  # SetFit's pairs and head need labels
        with pytest.raises(ValueError, match="strategy 'few_shot' does not train task"):
            make_config(tmp_path, data, task=task, sweep=few_shot)
    else:
        sweep = make_config(tmp_path, data, task=task, sweep=few_shot)
        assert [b.name for b in plan(sweep)] == ["few_shot@8"]
