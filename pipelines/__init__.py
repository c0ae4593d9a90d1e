"""KFP pipelines (wiring only) and their compiled IR YAML (``compiled/``)."""

from pathlib import Path

from transferkit.pipelines.strategy_sweep import SWEEP_PIPELINE_NAME, strategy_sweep
from transferkit.pipelines.transfer_learning import PIPELINE_NAME, transfer_learning

COMPILED_DIR = Path(__file__).with_name("compiled")
COMPILED = COMPILED_DIR / "transfer_learning.yaml"
COMPILED_SWEEP = COMPILED_DIR / "strategy_sweep.yaml"

__all__ = [
    "COMPILED",
    "COMPILED_SWEEP",
    "PIPELINE_NAME",
    "SWEEP_PIPELINE_NAME",
    "strategy_sweep",
    "transfer_learning",
]
