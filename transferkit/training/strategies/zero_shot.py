"""zero_shot: no training — a cosine head whose rows are the embedded label descriptions
(prompt templates × label texts, averaged), in the space of the data's features: the encoder
itself for text, a dual encoder's text tower for images (the CLIP recipe)."""

from __future__ import annotations

import logging

from transferkit.config import PipelineConfig, ZeroShotConfig
from transferkit.data import load_labels
from transferkit.features import load_features
from transferkit.metrics import metric_of_logits
from transferkit.training.context import Context, Fitted
from transferkit.training.runtime import device
from transferkit.training.strategies import register
from transferkit.training.zero_shot import label_prompts, prototype_similarities, zero_shot_head

log = logging.getLogger(__name__)


@register("zero_shot")
def fit(config: PipelineConfig, strategy: ZeroShotConfig, ctx: Context) -> Fitted:
    label_map = ctx.label_map
    tokenizer, encoder = ctx.family.prompt_encoder(ctx.model_dir, ctx.info.modality, ctx.info)
    # Prototypes are weights: embed the few prompts in full precision whatever the setting.
    # Image backbones record no token length: prompts take CLIP's context of 77 tokens.
    max_length = ctx.info.max_length or 77
    head, prototypes = zero_shot_head(
        tokenizer,
        encoder.to(device()),
        strategy,
        label_map.names,
        label_map.values,
        max_length,
        "fp32",
    )
    val_y = load_labels(ctx.dataset_dir, "validation")
    similarities = prototype_similarities(load_features(ctx.features_dir, "validation"), prototypes)
    value = metric_of_logits(val_y, similarities, label_map.names, config.evaluation.primary_metric)
    prompts = dict(
        zip(
            label_map.names, label_prompts(strategy, label_map.names, label_map.values), strict=True
        )
    )
    log.info(
        "zero-shot prototypes from %d prompts: validation %s %.4f",
        sum(map(len, prompts.values())),
        config.evaluation.primary_metric,
        value,
    )
    # Cosine similarity: the head expects unit vectors. No labelled example was read.
    return Fitted(head, value, 0, {"prompts": prompts}, normalize=True, labelled=0)
