"""lora: low-rank adapters (PEFT) on the family's attention projections (or the configured
target modules) train with the head; they are merged into the weights after training, so the
saved encoder is a plain model and serving needs no PEFT."""

from __future__ import annotations

from typing import Any

from transferkit.config import LoraConfig, PipelineConfig
from transferkit.training.context import Context, Fitted
from transferkit.training.groups import add_lora, body_groups, merge_lora
from transferkit.training.model import Classifier
from transferkit.training.strategies import register
from transferkit.training.tuning import train_through


@register("lora")
def fit(config: PipelineConfig, strategy: LoraConfig, ctx: Context) -> Fitted:
    targets = strategy.target_modules or list(ctx.capabilities().lora_targets)
    return train_through(
        config,
        strategy,
        ctx,
        lambda model: groups(model, strategy, config, targets),
        after=merge_lora,
    )


def groups(
    model: Classifier, strategy: LoraConfig, config: PipelineConfig, targets: list[str]
) -> list[dict[str, Any]]:
    """Wrap the body with adapters on ``targets``: only they (and the head) train."""
    add_lora(model, strategy, targets)
    return body_groups(model, config, weight_decay=0.0)
