"""partial_finetune: the top N of the family's blocks (and what follows them) train with the
head; the embeddings or stem and the lower blocks stay frozen."""

from __future__ import annotations

from typing import Any

from transferkit.config import PartialFinetuneConfig, PipelineConfig
from transferkit.training.context import Context, Fitted
from transferkit.training.groups import block_groups
from transferkit.training.model import Classifier
from transferkit.training.strategies import register
from transferkit.training.tuning import train_through


@register("partial_finetune")
def fit(config: PipelineConfig, strategy: PartialFinetuneConfig, ctx: Context) -> Fitted:
    return train_through(config, strategy, ctx, lambda model: groups(model, strategy, config))


def groups(
    model: Classifier, strategy: PartialFinetuneConfig, config: PipelineConfig
) -> list[dict[str, Any]]:
    """The top ``train_top_layers`` blocks and what follows them; the rest frozen."""
    training = config.training
    return block_groups(
        model,
        strategy.train_top_layers,
        strategy.layerwise_lr_decay,
        training.learning_rate,
        training.weight_decay,
    )
