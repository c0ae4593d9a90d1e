"""full_finetune: every backbone parameter trains with the head, optionally with layer-wise
learning-rate decay over the family's blocks (Howard & Ruder 2018)."""

from __future__ import annotations

from typing import Any

from transferkit.config import FullFinetuneConfig, PipelineConfig
from transferkit.training.context import Context, Fitted
from transferkit.training.groups import block_groups, body_groups
from transferkit.training.model import Classifier
from transferkit.training.strategies import register
from transferkit.training.tuning import train_through


@register("full_finetune")
def fit(config: PipelineConfig, strategy: FullFinetuneConfig, ctx: Context) -> Fitted:
    return train_through(config, strategy, ctx, lambda model: groups(model, strategy, config))


def groups(
    model: Classifier, strategy: FullFinetuneConfig, config: PipelineConfig
) -> list[dict[str, Any]]:
    """Every body parameter, block by block with layer-wise decay when it is below 1."""
    training = config.training
    if strategy.layerwise_lr_decay < 1:
        return block_groups(
            model, None, strategy.layerwise_lr_decay, training.learning_rate, training.weight_decay
        )
    return body_groups(model, config)
