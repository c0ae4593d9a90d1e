"""train: turn a backbone and a labelled dataset into a classifier, by the configured strategy.

This module only orchestrates: the strategies are plugins, one module each in
``transferkit.training.strategies`` (linear_probe, zero_shot, few_shot, full_finetune,
partial_finetune, lora, scratch, domain_adaptation, auto), registered by name; the backbone's
family (``transferkit.backbones``) says how to load, embed, freeze and save it. Every strategy
writes the same model folder (see ``transferkit.training.model``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from transferkit import storage
from transferkit.backbones import load_backbone_info
from transferkit.backbones.base import read_config
from transferkit.backbones.support import check_strategies
from transferkit.backbones.text import resolve_precision
from transferkit.config import PipelineConfig
from transferkit.data import load_label_map, load_labels
from transferkit.metrics import Decision, score, score_task
from transferkit.training.context import Context, Fitted, budget_rows
from transferkit.training.crossval import fold_datasets
from transferkit.training.distributed import Layout
from transferkit.training.imbalance import class_weights, decision, label_thresholds
from transferkit.training.model import (
    Classifier,
    ModelCard,
    load_classifier,
    predict_proba,
    save_classifier,
)
from transferkit.training.runtime import configure_torch, device, environment, seed_everything
from transferkit.training.strategies import fit_strategy

log = logging.getLogger(__name__)


class CrossValidation(BaseModel):
    """The strategy scored by k-fold cross-validation (``training.cross_validation_folds``)."""

    folds: int
    metric: str
    rows: int
    scores: list[float]
    mean: float
    std: float
    out_of_fold: float
    seconds: float


class TrainResult(BaseModel):
    """Summary of a training step."""

    strategy: str
    labelled_examples: int
    examples_per_class: int | None
    primary_metric: str
    validation_metric: float
    trainable_parameters: int
    total_parameters: int
    precision: str
    seconds: float
    details: dict[str, Any]
    cross_validation: CrossValidation | None = None


__all__ = ["CrossValidation", "TrainResult", "budget_rows", "train"]


def _fit_configured(config: PipelineConfig, ctx: Context, scratch: Path) -> tuple[Fitted, Context]:
    """Fit ``config.strategy``; the context the model ended on (domain adaptation replaces
    the backbone)."""
    scratch.mkdir(parents=True, exist_ok=True)
    weights = None
    if config.training.class_weights != "none":
        truth = load_labels(ctx.dataset_dir, "train")
        rows = truth if ctx.rows is None else truth[ctx.rows]
        weights = class_weights(config.training.class_weights, rows, ctx.label_map)
    fitted = fit_strategy(
        config, config.strategy, replace(ctx, scratch=scratch, class_weights=weights)
    )
    return fitted, fitted.context or ctx


def _save_decided(
    config: PipelineConfig,
    ctx: Context,
    fitted: Fitted,
    model_dir: Path,
    record: dict[str, Any],
    precision: str,
) -> None:
    """Save the fitted model with its decision rule (``training.decision_threshold``, or a
    multi-label model's ``training.label_thresholds``); a tuned threshold is chosen on the
    validation split's probabilities, predicted by the model as evaluate predicts it."""
    card = _card(config, ctx, fitted)
    metric = config.evaluation.primary_metric
    rule: Decision | None
    if card.regression:  # a score decides nothing
        rule = None
    elif card.multi_label:  # a threshold per label (training.label_thresholds)
        setting: Any = config.training.label_thresholds
        tuned = isinstance(setting, str)
        sets = _validation_proba(ctx, fitted, card, precision, config) if tuned else None
        rule, measured = label_thresholds(setting, ctx.labels, metric, sets)
    else:
        setting = config.training.decision_threshold
        validation = None
        if setting == "tuned":
            validation = _validation_proba(ctx, fitted, card, precision, config)
        rule, measured = decision(
            setting, ctx.label_map, config.evaluation.positive_label, metric, validation
        )
        if validation is not None:
            truth, proba = validation
            at_argmax = score(truth, proba.argmax(axis=1), ctx.labels, proba).metric(metric)
            measured[f"validation_{metric}_argmax"] = at_argmax
    if rule is not None:
        record.setdefault("details", {})["decision"] = {**rule.model_dump(), **measured}
    save_classifier(
        model_dir,
        card.model_copy(update={"decision": rule}),
        fitted.head,
        record,
        encoder=fitted.encoder,
        encoder_dir=ctx.backbone_dir / "model",
    )


def _validation_proba(
    ctx: Context, fitted: Fitted, card: ModelCard, precision: str, config: PipelineConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Validation labels and the fitted model's probabilities for them, predicted as
    evaluate predicts (the whole model, the evaluation's precision)."""
    processor, encoder = fitted.encoder or ctx.load_encoder()
    model = Classifier(encoder, len(ctx.labels), card.head_inputs(encoder.hidden_size))
    model.head.load_state_dict(fitted.head.state_dict())
    inputs, truth = ctx.modality.load(ctx.dataset_dir, "validation")
    proba = predict_proba(
        model.to(ctx.target).eval(),
        processor,
        card,
        inputs,
        config.evaluation.batch_size,
        precision,
    )
    return truth, proba


def _card(config: PipelineConfig, ctx: Context, fitted: Fitted) -> ModelCard:
    """The model card of a fitted strategy."""
    info = ctx.info
    return ModelCard(
        labels=ctx.label_map.names,
        label_values=ctx.label_map.values,
        pooling=info.pooling,
        normalize=info.normalize if fitted.normalize is None else fitted.normalize,
        max_length=info.max_length,
        strategy=config.strategy.name,
        backbone_source=info.source,
        backbone_fingerprint=info.fingerprint,
        data_fingerprint=storage.read_json(ctx.dataset_dir / "stats.json")["fingerprint"],
        environment=environment(config.training.seed),
        task=f"{info.modality}-{'regression' if config.task == 'regression' else 'classification'}",
        image=info.image,
        family=ctx.family.name,
        modality=info.modality,
        multi_label=config.task == "multi_label",
        regression=config.task == "regression",
        pair=config.data.text_pair_column is not None,
        cross_encoder=fitted.cross_encoder,
    )


def _cross_validate(config: PipelineConfig, ctx: Context, scratch: Path) -> CrossValidation:
    """Fit the strategy once per fold and score each fold's model on its held-out rows,
    through the saved model folder and the evaluation's precision, as evaluate scores."""
    folds = config.training.cross_validation_folds
    assert folds is not None
    metric = config.evaluation.primary_metric
    started = time.perf_counter()
    scores: list[float] = []
    truths, probabilities, decided = [], [], []
    precision = resolve_precision(config.evaluation.precision, ctx.target)
    positive = None
    if config.task == "classification":
        positive = ctx.label_map.positive(config.evaluation.positive_label)
    for fold in fold_datasets(
        ctx.dataset_dir, ctx.features_dir, folds, config.training.seed, scratch
    ):
        fold_started = time.perf_counter()
        fold_ctx = replace(
            ctx,
            dataset_dir=fold.dataset_dir,
            features_dir=fold.features_dir,
            rows=budget_rows(config, fold.dataset_dir, ctx.labels),
        )
        seed_everything(config.training.seed)
        fitted, fold_ctx = _fit_configured(config, fold_ctx, fold.dataset_dir.parent / "work")
        model_dir = fold.dataset_dir.parent / "model"
        _save_decided(config, fold_ctx, fitted, model_dir, {}, precision)
        tokenizer, model, card = load_classifier(model_dir)
        inputs, truth = fold_ctx.modality.load(fold.dataset_dir, "test")
        proba = predict_proba(
            model.to(ctx.target), tokenizer, card, inputs, config.evaluation.batch_size, precision
        )
        predicted = card.decide(proba)
        value = score_task(truth, predicted, proba, ctx.labels, positive).metric(metric)
        scores.append(value)
        truths.append(truth)
        probabilities.append(proba)
        decided.append(predicted)
        log.info(
            "cross-validation fold %d/%d: %s %.4f on %d held-out rows (trained on %d, early "
            "stopping on %d; %.0f s)",
            fold.index + 1,
            folds,
            metric,
            value,
            len(fold.held_out),
            len(fold.train),
            len(fold.stop),
            time.perf_counter() - fold_started,
        )
    truth, proba = np.concatenate(truths), np.concatenate(probabilities)
    pooled = score_task(truth, np.concatenate(decided), proba, ctx.labels, positive).metric(metric)
    result = CrossValidation(
        folds=folds,
        metric=metric,
        rows=len(truth),
        scores=scores,
        mean=float(np.mean(scores)),
        std=float(np.std(scores, ddof=1)),
        out_of_fold=pooled,
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info(
        "cross-validation: %s %.4f ± %.4f over %d folds (out-of-fold %.4f)",
        metric,
        result.mean,
        result.std,
        folds,
        result.out_of_fold,
    )
    return result


def artifact_metadata(training: dict[str, Any]) -> dict[str, Any]:
    """What the KFP model artifact shows of a training.json."""
    keys = ("strategy", "precision", "validation_metric", "trainable_parameters")
    return {key: training[key] for key in keys}


def train(
    config: PipelineConfig,
    dataset_dir: Path,
    backbone_dir: Path,
    features_dir: Path,
    output_dir: Path,
    layout: Layout | None = None,
) -> TrainResult:
    """Train a classifier with ``config.strategy`` and save it to ``output_dir``.

    Args:
        config: the run configuration.
        dataset_dir: the ingest_data artifact (texts, labels, label map).
        backbone_dir: the fetch_backbone artifact.
        features_dir: the extract_features artifact (frozen features of every split).
        output_dir: model folder to create atomically.
        layout: this node's place in a multi-node job (``transferkit.training.node``);
            None: one node.

    Returns:
        The validation metric, parameter counts, precision and timing.

    Raises:
        TrainingError: training diverged.
    """
    started = time.perf_counter()
    configure_torch(config)
    seed_everything(config.training.seed)
    label_map = load_label_map(dataset_dir)
    target = device()
    ctx = Context(
        dataset_dir,
        backbone_dir,
        features_dir,
        load_backbone_info(backbone_dir),
        label_map,
        target,
        resolve_precision(config.training.precision, target),
        budget_rows(config, dataset_dir, label_map.names),
        layout or Layout(),
    )
    # The strategy fits the backbone's family (checked here, not at fetch: see
    # backbones.fetch.resolve_family).
    check_strategies(config, ctx.family, read_config(ctx.model_dir), sweep=False)
    if ctx.rows is not None:
        log.info(
            "label budget: %d training rows (up to %d per label)",
            len(ctx.rows),
            config.training.examples_per_class,
        )
    strategy = config.strategy
    with tempfile.TemporaryDirectory(prefix="transferkit-train-") as scratch:
        folds = None
        if config.training.cross_validation_folds:
            folds = _cross_validate(config, ctx, Path(scratch) / "folds")
            seed_everything(config.training.seed)
        fitted, ctx = _fit_configured(config, ctx, Path(scratch) / "final")
        info = ctx.info
        if fitted.labelled is not None:
            labelled = fitted.labelled
        elif ctx.rows is not None:
            labelled = len(ctx.rows)
        else:
            labelled = len(load_labels(dataset_dir, "train"))
        result = TrainResult(
            strategy=strategy.name,
            labelled_examples=labelled,
            examples_per_class=config.training.examples_per_class,
            primary_metric=config.evaluation.primary_metric,
            validation_metric=fitted.validation_metric,
            trainable_parameters=fitted.trainable,
            total_parameters=info.parameters + ctx.head_parameters,
            precision=ctx.precision,
            # The final fit; cross-validation's own time is in cross_validation.seconds.
            seconds=round(time.perf_counter() - started - (folds.seconds if folds else 0), 3),
            details=fitted.details,
            cross_validation=folds,
        )
        record = result.model_dump()
        precision = resolve_precision(config.evaluation.precision, ctx.target)
        _save_decided(config, ctx, fitted, output_dir, record, precision)
        result = TrainResult.model_validate(record)
    log.info(
        "trained %s: validation %s %.4f (%s trainable parameters)",
        strategy.name,
        result.primary_metric,
        result.validation_metric,
        f"{result.trainable_parameters:,}",
    )
    return result
