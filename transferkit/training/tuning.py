"""The one loop behind every strategy that trains through the backbone (full, partial, LoRA,
scratch): build the classifier, feed it the modality's inputs, train with the strategy's
optimiser groups, on one process, several, or several nodes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from transferkit import storage
from transferkit.config import LinearProbeConfig, PipelineConfig
from transferkit.training.checkpoint import Checkpoints
from transferkit.training.context import Context, Fitted, fit_linear_probe
from transferkit.training.distributed import finetune_parallel, world_size
from transferkit.training.finetune import finetune
from transferkit.training.groups import head_group
from transferkit.training.model import BiEncoderClassifier, Classifier

log = logging.getLogger(__name__)

Groups = Callable[[Classifier], list[dict[str, Any]]]


def tunable_model(
    config: PipelineConfig, strategy: Any, ctx: Context, random_init: bool = False
) -> tuple[Classifier, Any]:
    """The classifier a training strategy starts from: pre-trained (or random) plus a head,
    the head from a linear probe when ``strategy.head_init`` is 'probe' (LP-FT)."""
    processor, encoder = ctx.load_encoder(random_init)
    build = BiEncoderClassifier if bi_encoder(strategy, ctx) else Classifier
    model = build(encoder, len(ctx.labels)).to(ctx.target)
    if config.task == "regression":  # a fresh head starts at the mean score, not near 0
        with torch.no_grad():
            model.head.bias.fill_(float(ctx.train_split()[1].mean()))
    if getattr(strategy, "head_init", "random") == "probe":
        head, fit = fit_linear_probe(config, LinearProbeConfig(), ctx)
        model.head.load_state_dict({k: v.to(ctx.target) for k, v in head.state_dict().items()})
        log.info("head initialised from a linear probe (validation %.4f)", fit.validation_metric)
    return model, processor


def bi_encoder(strategy: Any, ctx: Context) -> bool:
    """Whether the strategy trains text pairs as a bi-encoder (each text on its own)."""
    return ctx.pairs and getattr(strategy, "pair_encoder", "cross") == "bi"


def train_through(
    config: PipelineConfig,
    strategy: Any,
    ctx: Context,
    groups: Groups,
    random_init: bool = False,
    after: Callable[[Classifier], None] | None = None,
) -> Fitted:
    """Train the backbone and head with ``groups(model)`` (which may freeze or wrap the
    body); ``after`` runs on the trained model before it is kept (LoRA merges)."""
    model, processor = tunable_model(config, strategy, ctx, random_init)
    inputs, truth = ctx.train_split()
    modality = ctx.modality
    separate = bi_encoder(strategy, ctx)
    train_inputs = modality.inputs(
        processor, inputs, ctx.info, config.training.augmentation, separate
    )
    val_inputs, val_truth = modality.load(ctx.dataset_dir, "validation")
    arguments = (
        config,
        train_inputs,
        truth,
        modality.inputs(processor, val_inputs, ctx.info, separate=separate),
        val_truth,
        ctx.labels,
    )
    optimiser_groups = groups(model) + head_group(model, strategy, config)
    world = world_size(config, ctx.layout)
    if world > 1 or ctx.layout.nodes > 1:
        history = finetune_parallel(
            model,
            *arguments,
            optimiser_groups,
            ctx.precision,
            world,
            ctx.layout,
            class_weights=ctx.class_weights,
        )
    else:
        checkpoints = Checkpoints.for_training(
            config,
            storage.read_json(ctx.dataset_dir / "stats.json")["fingerprint"],
            ctx.info.fingerprint,
        )
        history = finetune(
            model,
            *arguments,
            optimiser_groups,
            ctx.precision,
            checkpoints=checkpoints,
            class_weights=ctx.class_weights,
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if after is not None:
        after(model)
    return Fitted(
        model.head,
        history.best_validation_metric,
        trainable,
        history.model_dump(),
        (processor, model.encoder),
        cross_encoder=ctx.pairs and not separate,
    )
