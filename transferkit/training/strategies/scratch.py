"""scratch: the control — the backbone's architecture, randomly initialised, trained on the
target data with every parameter moving. Transfer that does not beat it did not help."""

from __future__ import annotations

from transferkit.config import PipelineConfig, ScratchConfig
from transferkit.training.context import Context, Fitted
from transferkit.training.groups import body_groups
from transferkit.training.strategies import register
from transferkit.training.tuning import train_through


@register("scratch")
def fit(config: PipelineConfig, strategy: ScratchConfig, ctx: Context) -> Fitted:
    return train_through(
        config, strategy, ctx, lambda model: body_groups(model, config), random_init=True
    )
