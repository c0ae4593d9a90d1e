"""KFP pipelines (wiring only) and their compiled IR YAML (``compiled/``)."""

from pathlib import Path
from typing import Any

from transferkit.pipelines import strategy_sweep as _sweep
from transferkit.pipelines import transfer_learning as _single
from transferkit.pipelines.strategy_sweep import SWEEP_PIPELINE_NAME, strategy_sweep
from transferkit.pipelines.transfer_learning import PIPELINE_NAME, transfer_learning

from transferkit.config import PipelineConfig

COMPILED_DIR = Path(__file__).with_name("compiled")
COMPILED = COMPILED_DIR / "transfer_learning.yaml"
COMPILED_SWEEP = COMPILED_DIR / "strategy_sweep.yaml"


def build_for(config: PipelineConfig) -> Any:
    """The pipeline ``config`` needs (the sweep DAG when it has a sweep), built with its
    compile-time settings: resources, placement, Secrets and the sweep's parallelism."""
    return _sweep.build(config) if config.sweep is not None else _single.build(config)


__all__ = [
    "COMPILED",
    "COMPILED_SWEEP",
    "PIPELINE_NAME",
    "SWEEP_PIPELINE_NAME",
    "build_for",
    "strategy_sweep",
    "transfer_learning",
]
