"""What each step of the DAG reads of the configuration, and nothing more.

KFP keys a step's cache on its inputs. A step given the whole configuration misses its cache
on any change: a new ``training.seed`` would re-run ingest, fetch and extraction, and on a
cluster re-extract features on GPU nodes. So each step receives only the parts it reads (its
*slice*), plus the content stamps of its inputs, and a change re-runs only the steps downstream
of what changed.

A slice cannot silently drift from what the code reads: the parts a step was not given are
:class:`Withheld` in the config it rebuilds, and any use of one is an error that names the step
and the part (the tests run every step on its slice).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from transferkit.config import PipelineConfig, Withheld
from transferkit.errors import ConfigError

# The sections (or ``section.field`` parts) each step reads. ``resources``, ``kubernetes`` and
# ``trigger`` are never run parameters (``PipelineConfig.as_parameter``). Training, evaluation
# and registration read nearly everything; the point is what the first three steps do not
# read: the strategy, the training options (but the precision extraction runs in), the
# evaluation options (but its batch size), the registry.
EVERYTHING = (
    "task",
    "data",
    "backbone",
    "backbone_selection",
    "strategy",
    "training",
    "evaluation",
    "registry",
    "storage",
    "sweep",
    "runtime",
)
TRAIN = tuple(s for s in EVERYTHING if s not in ("registry", "sweep"))
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "ingest_data": ("task", "data", "storage"),
    # Ranking candidate backbones (backbone_selection) embeds a sample as extraction does.
    "fetch_backbone": (
        "task",
        "data",
        "backbone",
        "backbone_selection",
        "storage",
        "training.precision",
        "evaluation.batch_size",
    ),
    "extract_features": (
        "task",
        "data",
        "backbone",
        "backbone_selection",
        "storage",
        "runtime.work_dir",
        "runtime.feature_cache",
        "runtime.num_threads",
        "training.precision",
        "evaluation.batch_size",
    ),
    "train": TRAIN,
    # The launcher of a multi-node TrainJob sizes, places and credits the job's pods.
    "train_nodes": (*TRAIN, "resources.train", "kubernetes"),
    "evaluate": TRAIN,
    # Registration always runs (it has side effects in MLflow): it may read everything.
    "register_model": EVERYTHING,
    # A sweep's planner and comparison read the sweep itself and every branch's options.
    "plan_sweep": EVERYTHING,
    "compare_strategies": EVERYTHING,
}
# The run parameter that carries each step's slice.
PARAMETERS = {step: f"{step}_config" for step in STEP_INPUTS}
PARAMETERS["train_nodes"] = PARAMETERS["train"]
# The steps of each pipeline whose slice is a run parameter: in a sweep, the branches' train
# and evaluate read the planner's branch configs, and registration reads the selected one.
SINGLE_STEPS: tuple[str, ...] = (
    "ingest_data",
    "fetch_backbone",
    "extract_features",
    "train",
    "evaluate",
    "register_model",
)
SWEEP_STEPS: tuple[str, ...] = (
    "ingest_data",
    "fetch_backbone",
    "extract_features",
    "plan_sweep",
    "compare_strategies",
)


def step_slice(config: PipelineConfig, step: str) -> dict[str, Any]:
    """The parts of ``config`` that ``step`` reads, as its run parameter (a JSON struct)."""
    full = config.model_dump(mode="json", exclude_none=True, exclude=config.withheld())
    out: dict[str, Any] = {}
    for path in STEP_INPUTS[step]:
        section, _, field = path.partition(".")
        if section not in full:  # unset (None): left out, as as_parameter leaves it out
            continue
        if field:
            if field in full[section]:
                out.setdefault(section, {})[field] = full[section][field]
        else:
            out[section] = full[section]
    return out


def step_arguments(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """The run parameters of ``config``'s pipeline: one slice per step that takes one."""
    steps = SWEEP_STEPS if config.sweep is not None else SINGLE_STEPS
    steps = tuple(train_step(config) if step == "train" else step for step in steps)
    return {PARAMETERS[step]: step_slice(config, step) for step in steps}


def train_step(config: PipelineConfig) -> str:
    """The training step ``config`` runs: the TrainJob launcher for several nodes."""
    return "train_nodes" if config.training.nodes > 1 else "train"


def branch_arguments(branch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What one sweep branch's train and evaluate steps receive, from its whole config."""
    config = PipelineConfig.model_validate(branch)
    return {
        "train": step_slice(config, train_step(config)),
        "evaluate": step_slice(config, "evaluate"),
    }


def step_config(value: dict[str, Any], step: str) -> PipelineConfig:
    """Rebuild the configuration a step received: its slice validated part by part, every
    other part :class:`Withheld`.

    The whole configuration was validated, cross-checks included, when the run was made
    (``transferkit run``/``submit``); a step checks the types of what it was given.

    Raises:
        ConfigError: a part of the slice is invalid, or the slice holds a part the step does
            not read (a parameter meant for another step).
    """
    paths = STEP_INPUTS[step]
    sections = {path.partition(".")[0] for path in paths}
    if extra := sorted(set(value) - sections):
        raise ConfigError(
            f"step {step} was given config.{extra[0]}, which it does not read; pass it the "
            f"'{PARAMETERS[step]}' of transferkit.step_inputs.step_arguments"
        )
    parts: dict[str, Any] = {}
    fields = PipelineConfig.model_fields
    for section in sections:
        kept = [p.partition(".")[2] for p in paths if p.partition(".")[0] == section]
        annotation: Any = fields[section].annotation
        raw = value.get(section)
        try:
            if raw is None:
                parts[section] = fields[section].get_default(call_default_factory=True)
            else:
                parts[section] = TypeAdapter(annotation).validate_python(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join([section, *(str(part) for part in first["loc"])])
            raise ConfigError(
                f"step {step}: config.{where}: {first['msg']}; run `transferkit validate` on "
                "the whole config"
            ) from None
        if "" not in kept and isinstance(parts[section], BaseModel):
            model = parts[section]
            for name in type(model).model_fields:
                if name not in kept:
                    object.__setattr__(model, name, Withheld(step, f"{section}.{name}"))
    config = PipelineConfig.model_construct(**parts)
    for name in fields:
        if name not in sections:
            object.__setattr__(config, name, Withheld(step, name))
    return config


def selected_arguments(branch: dict[str, Any]) -> dict[str, Any]:
    """What registration receives of the selected sweep branch, from its whole config."""
    return step_slice(PipelineConfig.model_validate(branch), "register_model")


def as_step(config: PipelineConfig, step: str) -> PipelineConfig:
    """``config`` as ``step`` sees it in a pipeline: its part, every other part withheld."""
    return step_config(step_slice(config, step), step)
