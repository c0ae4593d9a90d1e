"""domain_adaptation: adapt the backbone to the target domain without labels, with its
family's own objective, then train the ``then`` strategy on the adapted backbone.

Objectives (``Capabilities.adaptation``): 'mlm' — continued masked-language-model training
on unlabelled target text (BERT-like encoders, ``training.domain``); 'clm' — continued
causal-LM training (GPT-style decoders, ``training.causal``); 'adabn' — BatchNorm statistics
re-estimated on target images (``training.adabn``). The adapted backbone is an ordinary
backbone artifact: features are extracted from it again and every strategy runs on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from transferkit import storage
from transferkit.backbones import load_backbone_info
from transferkit.config import DomainAdaptationConfig, PipelineConfig
from transferkit.features import extract_features
from transferkit.training.context import Context, Fitted
from transferkit.training.runtime import seed_everything
from transferkit.training.strategies import fit_strategy, register

Objective = Callable[[PipelineConfig, DomainAdaptationConfig, Context, Path, Path], dict[str, Any]]


def _text(module: str, function: str) -> Objective:
    def adapt(
        config: PipelineConfig,
        strategy: DomainAdaptationConfig,
        ctx: Context,
        output: Path,
        scratch: Path,
    ) -> dict[str, Any]:
        adapt_text = getattr(importlib.import_module(module), function)
        return adapt_text(
            strategy,
            config.storage,
            ctx.backbone_dir,
            ctx.info,
            output,
            ctx.precision,
            config.training.seed,
            ctx.target,
        )

    return adapt


def _adabn(
    config: PipelineConfig,
    strategy: DomainAdaptationConfig,
    ctx: Context,
    output: Path,
    scratch: Path,
) -> dict[str, Any]:
    from transferkit.training.adabn import adapt_batch_norm

    return adapt_batch_norm(
        _target_images(config, strategy, ctx, scratch),
        ctx.backbone_dir,
        ctx.info,
        output,
        strategy.adabn_batch_size,
        ctx.target,
    )


def _target_images(
    config: PipelineConfig, strategy: DomainAdaptationConfig, ctx: Context, scratch: Path
) -> np.ndarray:
    """Unlabelled target images for AdaBN: an npz's image arrays, else the training split."""
    if strategy.unlabelled_uri is None:
        return ctx.modality.load(ctx.dataset_dir, "train")[0]
    from transferkit.data.images import read_unlabelled_npz

    path = storage.fetch_file(strategy.unlabelled_uri, scratch / "unlabelled", config.storage)
    return read_unlabelled_npz(path, strategy.unlabelled_uri)


OBJECTIVES: dict[str, Objective] = {
    "mlm": _text("transferkit.training.domain", "adapt_backbone"),
    "clm": _text("transferkit.training.causal", "adapt_causal_lm"),
    "adabn": _adabn,
}


def adapted_context(
    config: PipelineConfig, strategy: DomainAdaptationConfig, ctx: Context, scratch: Path
) -> tuple[Context, dict[str, Any]]:
    """Adapt the backbone; re-extract the features with the adapted one."""
    objective = ctx.capabilities().adaptation
    assert objective is not None  # refused at validate / fetch (backbones.support)
    adapted_dir = scratch / "backbone"
    record = OBJECTIVES[objective](config, strategy, ctx, adapted_dir, scratch)
    extract_features(config, ctx.dataset_dir, adapted_dir, scratch / "features")
    adapted = replace(
        ctx,
        backbone_dir=adapted_dir,
        features_dir=scratch / "features",
        info=load_backbone_info(adapted_dir),
    )
    return adapted, {"objective": objective, **record}


@register("domain_adaptation")
def fit(config: PipelineConfig, strategy: DomainAdaptationConfig, ctx: Context) -> Fitted:
    assert ctx.scratch is not None
    scratch = ctx.scratch / "adaptation"
    scratch.mkdir(parents=True, exist_ok=True)
    adapted, record = adapted_context(config, strategy, ctx, scratch)
    seed_everything(config.training.seed)
    fitted = fit_strategy(config.with_strategy(strategy.then), strategy.then, adapted)
    if record["objective"] != "adabn":
        # The language-model objective moved every encoder weight, whatever the next strategy
        # trains (AdaBN only re-estimates statistics: no parameter is trained).
        fitted.trainable = max(fitted.trainable, ctx.info.parameters + ctx.head_parameters)
    fitted.details = {"adaptation": record, "then": strategy.then.name, **fitted.details}
    fitted.context = adapted
    return fitted
