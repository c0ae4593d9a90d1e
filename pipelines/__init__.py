"""KFP pipelines (wiring only) and their compiled IR YAML (``compiled/``)."""

from pathlib import Path

from transferkit.pipelines.transfer_learning import PIPELINE_NAME, transfer_learning

COMPILED = Path(__file__).with_name("compiled") / "transfer_learning.yaml"

__all__ = ["COMPILED", "PIPELINE_NAME", "transfer_learning"]
