"""zero_shot: no training — a cosine head whose rows are the embedded label descriptions
(prompt templates × label texts, averaged), in the space of the data's features: the encoder
itself for text, a dual encoder's text tower for images (the CLIP recipe). Text pairs with a
score (task: regression): the cosine of the two texts' embeddings, mapped linearly from
[0, 1] onto the training targets' range; the head reads the pair's features, whose last
block of unit-vector products sums to that cosine. Label sets (task: multi_label): each
label's logit is the scaled cosine less its mean over the training inputs (read without their
labels), so a label's probability passes 0.5 where an input is closer to it than the usual
input is; the decision thresholds are then chosen on validation like any model's."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from transferkit.config import PipelineConfig, ZeroShotConfig
from transferkit.data import load_labels
from transferkit.features import load_features
from transferkit.metrics import metric_of_logits
from transferkit.multilabel import metric_of_set_logits
from transferkit.regression import score_regression
from transferkit.training.context import Context, Fitted
from transferkit.training.runtime import device
from transferkit.training.strategies import register
from transferkit.training.zero_shot import label_prompts, prototype_similarities, zero_shot_head

log = logging.getLogger(__name__)


def _cosine_head(hidden: int, low: float, high: float) -> nn.Linear:
    """A head on pair features [u, v, |u - v|, u * v] (unit u, v) whose output is
    ``low + (high - low) * cos(u, v)``: weight (high - low) on every product, 0 elsewhere."""
    head = nn.Linear(4 * hidden, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 3 * hidden :] = high - low
        head.bias.fill_(low)
    return head


def _fit_pairs(config: PipelineConfig, ctx: Context) -> Fitted:
    """Zero-shot scores of text pairs: the cosine of their embeddings (no training)."""
    targets = load_labels(ctx.dataset_dir, "train")
    low, high = float(targets.min()), float(targets.max())
    head = _cosine_head(ctx.info.hidden_size, low, high)
    features = load_features(ctx.features_dir, "validation")
    with torch.no_grad():
        predicted = head(torch.from_numpy(features)).numpy()[:, 0].astype(np.float64)
    metric = config.evaluation.primary_metric
    value = score_regression(load_labels(ctx.dataset_dir, "validation"), predicted).metric(metric)
    log.info("zero-shot cosine similarity of the pairs: validation %s %.4f", metric, value)
    # Only the range of the training targets was read (to put the cosine on their scale).
    details = {"score": f"{low:g} + ({high:g} - {low:g}) × cosine", "low": low, "high": high}
    return Fitted(head, value, 0, details, labelled=0)


@register("zero_shot")
def fit(config: PipelineConfig, strategy: ZeroShotConfig, ctx: Context) -> Fitted:
    if config.task == "regression":  # text pairs (validated with the config)
        return _fit_pairs(config, ctx)
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
    metric = config.evaluation.primary_metric
    details: dict[str, object] = {}
    if config.task == "multi_label":
        usual = _mean_similarity(load_features(ctx.features_dir, "train"), prototypes)
        with torch.no_grad():
            head.bias.copy_(torch.from_numpy(-strategy.scale * usual))
        details["mean_train_similarity"] = dict(zip(label_map.names, usual.tolist(), strict=True))
        value = metric_of_set_logits(
            val_y, strategy.scale * (similarities - usual), label_map.names, metric
        )
    else:
        value = metric_of_logits(val_y, similarities, label_map.names, metric)
    prompts = dict(
        zip(
            label_map.names, label_prompts(strategy, label_map.names, label_map.values), strict=True
        )
    )
    log.info(
        "zero-shot prototypes from %d prompts: validation %s %.4f",
        sum(map(len, prompts.values())),
        metric,
        value,
    )
    # Cosine similarity: the head expects unit vectors. No labelled example was read.
    return Fitted(head, value, 0, {"prompts": prompts, **details}, normalize=True, labelled=0)


def _mean_similarity(features: np.ndarray, prototypes: np.ndarray, block: int = 8192) -> np.ndarray:
    """Each label's mean cosine similarity over the rows of ``features`` [labels] (in blocks:
    a training split's unit copy would double its memory)."""
    total = np.zeros(len(prototypes))
    for start in range(0, len(features), block):
        total += prototype_similarities(features[start : start + block], prototypes).sum(axis=0)
    return (total / max(len(features), 1)).astype(np.float32)
