"""KFP pipelines (wiring only) and their compiled IR YAML (``compiled/``).

Building a pipeline object is not free (KFP assembles its spec when ``@dsl.pipeline`` runs:
about 1.5 s for the single DAG and 2.3 s for the sweep on a 2-core CPU), so each is built
when first asked for: ``transferkit run`` of a plain config never builds the sweep.
"""

from importlib import import_module
from pathlib import Path
from typing import Any

from transferkit.config import PipelineConfig

COMPILED_DIR = Path(__file__).with_name("compiled")
COMPILED = COMPILED_DIR / "transfer_learning.yaml"
COMPILED_SWEEP = COMPILED_DIR / "strategy_sweep.yaml"
PIPELINE_NAME = "transferkit-transfer-learning"
SWEEP_PIPELINE_NAME = "transferkit-strategy-sweep"

# Public pipeline name → the module that builds it (with its defaults) at import. The modules
# are named apart from the pipelines, so importing one never shadows the pipeline's name here.
_LAZY = {
    "transfer_learning": "transferkit.pipelines.single",
    "strategy_sweep": "transferkit.pipelines.sweep",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        pipeline = getattr(import_module(_LAZY[name]), name)
        globals()[name] = pipeline
        return pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_for(config: PipelineConfig) -> Any:
    """The pipeline ``config`` needs (the sweep DAG when it has a sweep), built with its
    compile-time settings: resources, placement, Secrets and the sweep's parallelism."""
    module = _LAZY["strategy_sweep" if config.sweep is not None else "transfer_learning"]
    return import_module(module).build(config)


__all__ = [
    "COMPILED",
    "COMPILED_SWEEP",
    "PIPELINE_NAME",
    "SWEEP_PIPELINE_NAME",
    "build_for",
    "strategy_sweep",
    "transfer_learning",
]
