"""Each step's part of the config: what it holds, what it withholds, and loud misuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transferkit.config import PipelineConfig, load_config
from transferkit.errors import ConfigError
from transferkit.step_inputs import (
    PARAMETERS,
    STEP_INPUTS,
    as_step,
    branch_arguments,
    step_arguments,
    step_config,
    step_slice,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "sst2-quickstart.yaml"


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return load_config(QUICKSTART).resolved(ROOT)


def test_the_first_steps_are_not_given_the_training_options(config: PipelineConfig) -> None:
    ingest = step_slice(config, "ingest_data")
    assert sorted(ingest) == ["data", "storage", "task"]
    assert ingest["data"] == config.as_parameter()["data"]
    extract = step_slice(config, "extract_features")
    assert extract["training"] == {"precision": "auto"}
    assert extract["evaluation"] == {"batch_size": 128}
    assert set(extract["runtime"]) == {"work_dir", "feature_cache"}  # num_threads unset
    assert "strategy" not in extract
    assert "registry" not in extract
    train = step_slice(config, "train")
    assert "registry" not in train
    assert train["training"]["seed"] == 42
    assert step_slice(config, "register_model")["registry"]["model_name"] == "sst2-sentiment"


def test_run_parameters_are_json_and_name_their_steps(config: PipelineConfig) -> None:
    arguments = step_arguments(config)
    assert list(arguments) == [
        "ingest_data_config",
        "fetch_backbone_config",
        "extract_features_config",
        "train_config",
        "evaluate_config",
        "register_model_config",
    ]
    assert json.loads(json.dumps(arguments)) == arguments  # a KFP struct holds JSON only
    for name, value in arguments.items():
        assert not {"resources", "kubernetes"} & set(value), name


def test_a_step_rebuilds_its_part_and_nothing_else(config: PipelineConfig) -> None:
    extract = step_config(step_slice(config, "extract_features"), "extract_features")
    assert extract.backbone == config.backbone
    assert extract.training.precision == "auto"
    assert extract.feature_cache == config.feature_cache
    # What it dumps (a TrainJob's nodes, checkpoint keys) is what it was given.
    assert extract.as_parameter() == step_slice(config, "extract_features")
    train = step_config(step_slice(config, "train"), "train")
    assert train.as_parameter() == step_slice(config, "train")
    assert train.training == config.training


@pytest.mark.parametrize(
    ("step", "use", "named"),
    [
        ("extract_features", lambda c: c.training.seed + 1, "training.seed"),
        ("extract_features", lambda c: c.strategy.name, "strategy"),
        ("extract_features", lambda c: c.evaluation.primary_metric == "accuracy", "evaluation"),
        ("ingest_data", lambda c: c.backbone.uri, "backbone"),
        ("ingest_data", lambda c: bool(c.runtime), "runtime"),
        ("train", lambda c: c.registry.model_name, "registry"),
        ("train", lambda c: f"{c.sweep}", "sweep"),
    ],
)
def test_reading_a_withheld_part_fails_naming_the_step_and_the_part(
    config: PipelineConfig, step: str, use, named: str
) -> None:
    rebuilt = step_config(step_slice(config, step), step)
    with pytest.raises(ConfigError, match=rf"step {step} read config\.{named}") as caught:
        use(rebuilt)
    assert f"STEP_INPUTS['{step}']" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_step_given_the_whole_config_refuses_it(config: PipelineConfig) -> None:
    with pytest.raises(ConfigError, match=r"step ingest_data was given config\.backbone") as e:
        step_config(config.as_parameter(), "ingest_data")
    assert "ingest_data_config" in str(e.value)


def test_a_bad_value_in_a_part_is_one_line_naming_it(config: PipelineConfig) -> None:
    part = step_slice(config, "extract_features")
    part["training"]["precision"] = "fp8"
    with pytest.raises(ConfigError, match=r"config\.training\.precision: Input should be") as e:
        step_config(part, "extract_features")
    assert "\n" not in str(e.value)


def test_every_step_reads_only_known_parts() -> None:
    fields = PipelineConfig.model_fields
    for step, paths in STEP_INPUTS.items():
        assert step in PARAMETERS
        for path in paths:
            section, _, field = path.partition(".")
            assert section in fields, (step, path)
            if field:
                model = fields[section].annotation
                assert field in model.model_fields, (step, path)  # type: ignore[union-attr]


def test_sweeps_and_several_nodes_get_their_own_parts() -> None:
    sweep = load_config(ROOT / "examples" / "sst2-strategies.yaml").resolved(ROOT)
    arguments = step_arguments(sweep)
    assert list(arguments) == [
        "ingest_data_config",
        "fetch_backbone_config",
        "extract_features_config",
        "plan_sweep_config",
        "compare_strategies_config",
    ]
    assert "sweep" in arguments["plan_sweep_config"]
    assert "sweep" not in arguments["extract_features_config"]
    # The planner, on its part, plans what it plans on the whole config.
    from transferkit.sweep import plan

    planned = plan(as_step(sweep, "plan_sweep"))
    assert [b.config for b in planned] == [b.config for b in plan(sweep)]
    branch = sweep.branch(sweep.sweep.branches[0], 16).as_parameter()  # type: ignore[union-attr]
    parts = branch_arguments(branch)
    assert parts["train"] == parts["evaluate"]
    assert parts["train"]["training"]["examples_per_class"] == 16
    nodes = load_config(QUICKSTART, ["training.nodes=2", "strategy.name=full_finetune"])
    nodes = nodes.resolved(ROOT)
    launcher = step_arguments(nodes)["train_config"]
    assert {"resources", "kubernetes"} <= set(launcher)  # it sizes the TrainJob
    rebuilt = step_config(launcher, "train_nodes")
    assert rebuilt.resources.train == nodes.resources.train
    # The nodes it starts get the training part only.
    assert rebuilt.as_parameter() == step_slice(nodes, "train")
