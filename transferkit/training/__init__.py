"""train: turn a backbone and a labelled dataset into a classifier, by the configured strategy.

Strategies:

- ``linear_probe``: the backbone stays frozen; a logistic-regression head is fitted on the
  cached features from extract_features.
- ``zero_shot``: no training; a cosine head built from embedded label descriptions.
- ``full_finetune``, ``partial_finetune``, ``lora``, ``scratch``: the same training loop over
  different trainable parameters (see ``transferkit.training.strategies``); the head may start
  from the probe (LP-FT).

Every strategy writes the same model folder (see ``transferkit.training.model``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from transferkit import storage
from transferkit.backbones import BackboneInfo, load_backbone_info
from transferkit.backbones.text import (
    TextEncoder,
    load_text_encoder,
    random_text_encoder,
    resolve_precision,
    run_batched,
)
from transferkit.config import (
    FewShotConfig,
    LinearProbeConfig,
    LoraConfig,
    PipelineConfig,
    ScratchConfig,
    ZeroShotConfig,
)
from transferkit.data import LabelMap, load_label_map, load_split
from transferkit.features import load_features
from transferkit.metrics import score
from transferkit.training.few_shot import contrastive_tune, make_pairs, sample_per_class
from transferkit.training.finetune import finetune
from transferkit.training.model import ModelCard, TextClassifier, save_classifier
from transferkit.training.probe import ProbeFit, fit_probe
from transferkit.training.runtime import configure_torch, device, environment, seed_everything
from transferkit.training.strategies import TunedStrategy, merge_lora, parameter_groups
from transferkit.training.zero_shot import label_prompts, predict_with_prototypes, zero_shot_head

log = logging.getLogger(__name__)


class TrainResult(BaseModel):
    """Summary of a training step."""

    strategy: str
    primary_metric: str
    validation_metric: float
    trainable_parameters: int
    total_parameters: int
    precision: str
    seconds: float
    details: dict[str, Any]


def _probe(
    config: PipelineConfig,
    probe: LinearProbeConfig,
    dataset_dir: Path,
    features_dir: Path,
    labels: list[str],
) -> tuple[nn.Linear, ProbeFit]:
    """Fit the linear probe on the cached train features, selecting L2 on validation."""
    _, train_y = load_split(dataset_dir, "train")
    _, val_y = load_split(dataset_dir, "validation")
    return fit_probe(
        load_features(features_dir, "train"),
        train_y,
        load_features(features_dir, "validation"),
        val_y,
        labels,
        probe.l2_grid,
        probe.max_iter,
        config.evaluation.primary_metric,
    )


def _tunable_model(
    config: PipelineConfig,
    strategy: TunedStrategy,
    model_dir: Path,
    info: BackboneInfo,
    dataset_dir: Path,
    features_dir: Path,
    labels: list[str],
    target: torch.device,
) -> tuple[TextClassifier, Any]:
    """The classifier a training strategy starts from: pre-trained (or random) plus a head."""
    if isinstance(strategy, ScratchConfig):
        tokenizer, encoder = random_text_encoder(model_dir, info.pooling, info.normalize)
    else:
        tokenizer, encoder = load_text_encoder(model_dir, info.pooling, info.normalize)
    model = TextClassifier(encoder, len(labels)).to(target)
    if getattr(strategy, "head_init", "random") == "probe":
        head, fit = _probe(config, LinearProbeConfig(), dataset_dir, features_dir, labels)
        model.head.load_state_dict({k: v.to(target) for k, v in head.state_dict().items()})
        log.info("head initialised from a linear probe (validation %.4f)", fit.validation_metric)
    return model, tokenizer


def _few_shot(
    config: PipelineConfig,
    strategy: FewShotConfig,
    model_dir: Path,
    info: BackboneInfo,
    dataset_dir: Path,
    labels: list[str],
    precision: str,
) -> tuple[Any, TextEncoder, nn.Linear, float, dict[str, Any]]:
    """SetFit on k examples per label: contrastive encoder tuning, then a head on them."""
    texts, truth = load_split(dataset_dir, "train")
    chosen = sample_per_class(truth, strategy.examples_per_class, config.training.seed, labels)
    shots, shot_labels = [texts[i] for i in chosen], truth[chosen]
    tokenizer, encoder = load_text_encoder(model_dir, info.pooling, info.normalize)
    encoder.to(device())
    pairs = make_pairs(
        shot_labels, strategy.pair_iterations, np.random.default_rng(config.training.seed)
    )
    tuning = contrastive_tune(
        encoder, tokenizer, shots, pairs, strategy, info.max_length, precision
    )
    batch = config.evaluation.batch_size
    val_texts, val_truth = load_split(dataset_dir, "validation")
    head, fit = fit_probe(
        run_batched(encoder, tokenizer, shots, info.max_length, batch, precision, "embed shots"),
        shot_labels,
        run_batched(
            encoder, tokenizer, val_texts, info.max_length, batch, precision, "embed validation"
        ),
        val_truth,
        labels,
        [strategy.head_l2],
        300,
        config.evaluation.primary_metric,
        standardize=False,
    )
    log.info(
        "few-shot: %d examples, %d pairs, loss %.3f → %.3f, validation %.4f",
        len(chosen),
        len(pairs),
        tuning["first_loss"],
        tuning["last_loss"],
        fit.validation_metric,
    )
    details = {"examples": chosen.tolist(), "tuning": tuning, "head": fit.model_dump()}
    return tokenizer, encoder, head, fit.validation_metric, details


def _zero_shot(
    config: PipelineConfig,
    strategy: ZeroShotConfig,
    model_dir: Path,
    info: BackboneInfo,
    dataset_dir: Path,
    features_dir: Path,
    label_map: LabelMap,
) -> tuple[nn.Linear, float, dict[str, Any]]:
    """The prototype head, its validation metric (from cached features) and the prompts."""
    tokenizer, encoder = load_text_encoder(model_dir, info.pooling, True)
    # Prototypes are weights: embed the few prompts in full precision whatever the setting.
    head, prototypes = zero_shot_head(
        tokenizer,
        encoder.to(device()),
        strategy,
        label_map.names,
        label_map.values,
        info.max_length,
        "fp32",
    )
    _, val_y = load_split(dataset_dir, "validation")
    predicted = predict_with_prototypes(load_features(features_dir, "validation"), prototypes)
    value = score(val_y, predicted, label_map.names).metric(config.evaluation.primary_metric)
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
    return head, value, {"prompts": prompts}


def train(
    config: PipelineConfig,
    dataset_dir: Path,
    backbone_dir: Path,
    features_dir: Path,
    output_dir: Path,
) -> TrainResult:
    """Train a classifier with ``config.strategy`` and save it to ``output_dir``.

    Args:
        config: the run configuration.
        dataset_dir: the ingest_data artifact (texts, labels, label map).
        backbone_dir: the fetch_backbone artifact.
        features_dir: the extract_features artifact (frozen features of every split).
        output_dir: model folder to create atomically.

    Returns:
        The validation metric, parameter counts, precision and timing.

    Raises:
        TrainingError: training diverged.
    """
    started = time.perf_counter()
    configure_torch(config)
    seed_everything(config.training.seed)
    info = load_backbone_info(backbone_dir)
    label_map = load_label_map(dataset_dir)
    labels = label_map.names
    target = device()
    precision = resolve_precision(config.training.precision, target)
    strategy = config.strategy
    card = ModelCard(
        labels=labels,
        label_values=label_map.values,
        pooling=info.pooling,
        normalize=info.normalize,
        max_length=info.max_length,
        strategy=strategy.name,
        backbone_source=info.source,
        backbone_fingerprint=info.fingerprint,
        data_fingerprint=storage.read_json(dataset_dir / "stats.json")["fingerprint"],
        environment=environment(config.training.seed),
    )
    head_parameters = (info.hidden_size + 1) * len(labels)
    trained_encoder: tuple[Any, Any] | None = None
    frozen_dir: Path | None = backbone_dir / "model"
    if isinstance(strategy, LinearProbeConfig):
        head, fit = _probe(config, strategy, dataset_dir, features_dir, labels)
        details: dict[str, Any] = fit.model_dump()
        validation_metric = fit.validation_metric
        trainable = head_parameters
    elif isinstance(strategy, ZeroShotConfig):
        head, validation_metric, details = _zero_shot(
            config, strategy, backbone_dir / "model", info, dataset_dir, features_dir, label_map
        )
        card.normalize = True  # cosine similarity: the head expects unit vectors
        trainable = 0
    elif isinstance(strategy, FewShotConfig):
        tokenizer, encoder, head, validation_metric, details = _few_shot(
            config, strategy, backbone_dir / "model", info, dataset_dir, label_map.names, precision
        )
        trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        trainable += head_parameters
        trained_encoder, frozen_dir = (tokenizer, encoder), None
    else:
        model, tokenizer = _tunable_model(
            config,
            strategy,
            backbone_dir / "model",
            info,
            dataset_dir,
            features_dir,
            labels,
            target,
        )
        history = finetune(
            model,
            tokenizer,
            config,
            load_split(dataset_dir, "train"),
            load_split(dataset_dir, "validation"),
            labels,
            parameter_groups(model, strategy, config),
            precision,
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if isinstance(strategy, LoraConfig):
            merge_lora(model)
        head = model.head
        details = history.model_dump()
        validation_metric = history.best_validation_metric
        trained_encoder, frozen_dir = (tokenizer, model.encoder), None
    result = TrainResult(
        strategy=strategy.name,
        primary_metric=config.evaluation.primary_metric,
        validation_metric=validation_metric,
        trainable_parameters=trainable,
        total_parameters=info.parameters + head_parameters,
        precision=precision,
        seconds=round(time.perf_counter() - started, 3),
        details=details,
    )
    save_classifier(
        output_dir, card, head, result.model_dump(), encoder=trained_encoder, encoder_dir=frozen_dir
    )
    log.info(
        "trained %s: validation %s %.4f (%s trainable parameters)",
        strategy.name,
        result.primary_metric,
        validation_metric,
        f"{trainable:,}",
    )
    return result
