"""train: turn a backbone and a labelled dataset into a classifier, by the configured strategy.

Strategies:

- ``linear_probe``: the backbone stays frozen; a logistic-regression head is fitted on the
  cached features from extract_features.
- ``zero_shot``: no training; a cosine head built from embedded label descriptions.
- ``full_finetune``, ``partial_finetune``, ``lora``, ``scratch``: the same training loop over
  different trainable parameters (see ``transferkit.training.strategies``); the head may start
  from the probe (LP-FT).
- ``few_shot``: SetFit on k examples per label (``transferkit.training.few_shot``).
- ``domain_adaptation``: masked-language-model pre-training on unlabelled target text
  (``transferkit.training.domain``), then one of the strategies above on the adapted backbone.
- ``auto``: probe → partial → LoRA → full while each rung gains more than a margin on
  validation; the cheapest rung within the margin of the best is kept.

Every strategy writes the same model folder (see ``transferkit.training.model``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
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
from transferkit.backbones.vision import load_image_encoder
from transferkit.config import (
    FEW_SHOT_K,
    AutoStrategyConfig,
    DomainAdaptationConfig,
    FewShotConfig,
    LinearProbeConfig,
    LoraConfig,
    PipelineConfig,
    ScratchConfig,
    ZeroShotConfig,
)
from transferkit.data import (
    LabelMap,
    load_images,
    load_inputs,
    load_label_map,
    load_labels,
    load_split,
)
from transferkit.features import extract_features, load_features
from transferkit.metrics import metric_of_logits, score
from transferkit.training.adabn import adapt_batch_norm
from transferkit.training.checkpoint import Checkpoints
from transferkit.training.crossval import fold_datasets
from transferkit.training.distributed import Layout, finetune_parallel, world_size
from transferkit.training.domain import adapt_backbone
from transferkit.training.few_shot import contrastive_tune, make_pairs, sample_per_class
from transferkit.training.finetune import finetune
from transferkit.training.inputs import ImageInputs, Inputs, TextInputs
from transferkit.training.model import (
    ImageClassifier,
    ModelCard,
    TextClassifier,
    load_classifier,
    predict_proba,
    save_classifier,
)
from transferkit.training.probe import ProbeFit, fit_probe
from transferkit.training.runtime import configure_torch, device, environment, seed_everything
from transferkit.training.strategies import TunedStrategy, merge_lora, parameter_groups
from transferkit.training.zero_shot import label_prompts, prototype_similarities, zero_shot_head

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


def budget_rows(config: PipelineConfig, dataset_dir: Path, labels: list[str]) -> np.ndarray | None:
    """Training rows within the label budget (``training.examples_per_class``); None: all.

    Drawn with ``training.seed``, so the same config trains on the same rows, and a few_shot
    branch with k equal to the budget uses exactly these rows.
    """
    k = config.training.examples_per_class
    if k is None:
        return None
    truth = load_labels(dataset_dir, "train")
    return sample_per_class(truth, k, config.training.seed, labels, strict=False)


def _train_split(dataset_dir: Path, rows: np.ndarray | None) -> tuple[list[str], np.ndarray]:
    texts, truth = load_split(dataset_dir, "train")
    if rows is None:
        return texts, truth
    return [texts[i] for i in rows], truth[rows]


def _probe(
    config: PipelineConfig,
    probe: LinearProbeConfig,
    dataset_dir: Path,
    features_dir: Path,
    labels: list[str],
    rows: np.ndarray | None,
) -> tuple[nn.Linear, ProbeFit]:
    """Fit the linear probe on the cached train features, selecting L2 on validation."""
    train_y = load_labels(dataset_dir, "train")
    features = load_features(features_dir, "train")
    return fit_probe(
        features if rows is None else features[rows],
        train_y if rows is None else train_y[rows],
        load_features(features_dir, "validation"),
        load_labels(dataset_dir, "validation"),
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
    rows: np.ndarray | None,
) -> tuple[TextClassifier | ImageClassifier, Any]:
    """The classifier a training strategy starts from: pre-trained (or random) plus a head."""
    model: TextClassifier | ImageClassifier
    scratch = isinstance(strategy, ScratchConfig)
    if info.modality == "image":
        tokenizer = None
        vision = load_image_encoder(model_dir, random_init=scratch)
        model = ImageClassifier(vision, len(labels)).to(target)
    else:
        load = random_text_encoder if scratch else load_text_encoder
        tokenizer, encoder = load(model_dir, info.pooling, info.normalize)
        model = TextClassifier(encoder, len(labels)).to(target)
    if getattr(strategy, "head_init", "random") == "probe":
        head, fit = _probe(config, LinearProbeConfig(), dataset_dir, features_dir, labels, rows)
        model.head.load_state_dict({k: v.to(target) for k, v in head.state_dict().items()})
        log.info("head initialised from a linear probe (validation %.4f)", fit.validation_metric)
    return model, tokenizer


def _few_shot(
    config: PipelineConfig,
    strategy: FewShotConfig,
    model_dir: Path,
    info: BackboneInfo,
    dataset_dir: Path,
    label_map: LabelMap,
    precision: str,
    rows: np.ndarray | None,
) -> tuple[Any, TextEncoder, nn.Linear, float, dict[str, Any]]:
    """SetFit on k examples per label: contrastive encoder tuning, then a head on them."""
    labels = label_map.names
    texts, truth = load_split(dataset_dir, "train")
    pool = np.arange(len(truth)) if rows is None else rows
    # k is the label budget: ``rows`` holds up to k of every label, drawn with the same seed,
    # so this takes all of them, and refuses a label that has fewer than k.
    k = config.training.examples_per_class or FEW_SHOT_K
    chosen = pool[sample_per_class(truth[pool], k, config.training.seed, labels)]
    shots, shot_labels = [texts[i] for i in chosen], truth[chosen]
    templated = label_prompts(strategy, labels, label_map.values) if strategy.templates else []
    for label, prompts in enumerate(templated):
        shots += prompts
        shot_labels = np.concatenate([shot_labels, np.full(len(prompts), label)])
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
        "few-shot: %d examples + %d templated, %d pairs, loss %.3f → %.3f, validation %.4f",
        len(chosen),
        len(shots) - len(chosen),
        len(pairs),
        tuning["first_loss"],
        tuning["last_loss"],
        fit.validation_metric,
    )
    details = {
        "examples": chosen.tolist(),
        "templated_examples": shots[len(chosen) :],
        "tuning": tuning,
        "head": fit.model_dump(),
    }
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
    similarities = prototype_similarities(load_features(features_dir, "validation"), prototypes)
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
    return head, value, {"prompts": prompts}


@dataclass
class _Fitted:
    """What fitting one strategy produced, before it is saved."""

    head: nn.Linear
    validation_metric: float
    trainable: int
    details: dict[str, Any]
    encoder: tuple[Any, Any] | None = None  # (tokenizer, encoder) when the encoder changed
    normalize: bool | None = None  # the head's input normalisation, when it differs


@dataclass
class _Context:
    """Inputs every strategy reads."""

    dataset_dir: Path
    backbone_dir: Path
    features_dir: Path
    info: BackboneInfo
    label_map: LabelMap
    target: torch.device
    precision: str
    rows: np.ndarray | None
    layout: Layout = field(default_factory=Layout)  # this node's place in a multi-node job

    @property
    def labels(self) -> list[str]:
        return self.label_map.names

    @property
    def head_parameters(self) -> int:
        return (self.info.hidden_size + 1) * len(self.label_map)


def _inputs(
    config: PipelineConfig, ctx: _Context, tokenizer: Any
) -> tuple[Inputs, np.ndarray, Inputs, np.ndarray]:
    """Training inputs (within the label budget, augmented images) and validation inputs."""
    if ctx.info.modality == "image":
        assert ctx.info.image is not None
        images, truth = load_images(ctx.dataset_dir, "train")
        if ctx.rows is not None:
            images, truth = images[ctx.rows], truth[ctx.rows]
        val_images, val_truth = load_images(ctx.dataset_dir, "validation")
        return (
            ImageInputs(images, ctx.info.image, config.training.augmentation),
            truth,
            ImageInputs(val_images, ctx.info.image, None),
            val_truth,
        )
    texts, truth = _train_split(ctx.dataset_dir, ctx.rows)
    val_texts, val_truth = load_split(ctx.dataset_dir, "validation")
    return (
        TextInputs(tokenizer, texts, ctx.info.max_length),
        truth,
        TextInputs(tokenizer, val_texts, ctx.info.max_length),
        val_truth,
    )


def _fit(config: PipelineConfig, strategy: Any, ctx: _Context) -> _Fitted:
    """Train one (non-composite) strategy."""
    model_dir = ctx.backbone_dir / "model"
    if isinstance(strategy, LinearProbeConfig):
        head, fit = _probe(
            config, strategy, ctx.dataset_dir, ctx.features_dir, ctx.labels, ctx.rows
        )
        return _Fitted(head, fit.validation_metric, ctx.head_parameters, fit.model_dump())
    if isinstance(strategy, ZeroShotConfig):
        head, value, details = _zero_shot(
            config, strategy, model_dir, ctx.info, ctx.dataset_dir, ctx.features_dir, ctx.label_map
        )
        # Cosine similarity: the head expects unit vectors.
        return _Fitted(head, value, 0, details, normalize=True)
    if isinstance(strategy, FewShotConfig):
        tokenizer, encoder, head, value, details = _few_shot(
            config,
            strategy,
            model_dir,
            ctx.info,
            ctx.dataset_dir,
            ctx.label_map,
            ctx.precision,
            ctx.rows,
        )
        trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        return _Fitted(head, value, trainable + ctx.head_parameters, details, (tokenizer, encoder))
    model, tokenizer = _tunable_model(
        config,
        strategy,
        model_dir,
        ctx.info,
        ctx.dataset_dir,
        ctx.features_dir,
        ctx.labels,
        ctx.target,
        ctx.rows,
    )
    train_inputs, train_labels, val_inputs, val_labels = _inputs(config, ctx, tokenizer)
    groups = parameter_groups(model, strategy, config)
    arguments = (config, train_inputs, train_labels, val_inputs, val_labels, ctx.labels)
    world = world_size(config, ctx.layout)
    if world > 1 or ctx.layout.nodes > 1:
        history = finetune_parallel(model, *arguments, groups, ctx.precision, world, ctx.layout)
    else:
        checkpoints = Checkpoints.for_training(
            config,
            storage.read_json(ctx.dataset_dir / "stats.json")["fingerprint"],
            ctx.info.fingerprint,
        )
        history = finetune(model, *arguments, groups, ctx.precision, checkpoints=checkpoints)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(strategy, LoraConfig):
        assert isinstance(model, TextClassifier)
        merge_lora(model)
    return _Fitted(
        model.head,
        history.best_validation_metric,
        trainable,
        history.model_dump(),
        (tokenizer, model.encoder),
    )


def _auto(config: PipelineConfig, strategy: AutoStrategyConfig, ctx: _Context) -> _Fitted:
    """Climb the ladder while each rung gains more than the margin; keep the cheapest near-best."""
    metric = config.evaluation.primary_metric
    fitted: list[tuple[str, _Fitted, float]] = []
    best: _Fitted | None = None
    stopped = "reached the top of the ladder"
    for name in strategy.ladder:
        rung = config.with_strategy(strategy.rung(name), strategy.training.get(name))
        seed_everything(config.training.seed)
        started = time.perf_counter()
        result = _fit(rung, rung.strategy, ctx)
        fitted.append((name, result, round(time.perf_counter() - started, 1)))
        gain = None if best is None else result.validation_metric - best.validation_metric
        log.info(
            "auto: %s validation %s %.4f%s",
            name,
            metric,
            result.validation_metric,
            "" if gain is None else f" (gain {gain:+.4f} over the best so far)",
        )
        if best is None or result.validation_metric > best.validation_metric:
            best = result
        if gain is not None and gain <= strategy.margin:
            stopped = f"{name} gained {gain:+.4f} ≤ margin {strategy.margin:g}: stopped escalating"
            break
    assert best is not None
    floor = best.validation_metric - strategy.margin
    selected, chosen, _ = next(item for item in fitted if item[1].validation_metric >= floor)
    log.info("auto: selected %s (%s)", selected, stopped)
    chosen.details = {
        "selected": selected,
        "stopped": stopped,
        "ladder": [
            {
                "strategy": rung_name,
                f"validation_{metric}": item.validation_metric,
                "trainable_parameters": item.trainable,
                "seconds": seconds,
            }
            for rung_name, item, seconds in fitted
        ],
        "selected_details": chosen.details,
    }
    return chosen


def _adapted(
    config: PipelineConfig,
    strategy: DomainAdaptationConfig,
    ctx: _Context,
    scratch: Path,
) -> tuple[_Context, dict[str, Any]]:
    """Adapt the backbone to the target domain; re-extract features with the adapted one."""
    adapted_dir = scratch / "backbone"
    if ctx.info.modality == "image":
        record = adapt_batch_norm(
            _target_images(config, strategy, ctx.dataset_dir, scratch),
            ctx.backbone_dir,
            ctx.info,
            adapted_dir,
            strategy.adabn_batch_size,
            ctx.target,
        )
    else:
        record = adapt_backbone(
            strategy,
            config.storage,
            ctx.backbone_dir,
            ctx.info,
            adapted_dir,
            ctx.precision,
            config.training.seed,
            ctx.target,
        )
    extract_features(config, ctx.dataset_dir, adapted_dir, scratch / "features")
    adapted = _Context(
        ctx.dataset_dir,
        adapted_dir,
        scratch / "features",
        load_backbone_info(adapted_dir),
        ctx.label_map,
        ctx.target,
        ctx.precision,
        ctx.rows,
        ctx.layout,
    )
    return adapted, record


def _target_images(
    config: PipelineConfig, strategy: DomainAdaptationConfig, dataset_dir: Path, scratch: Path
) -> np.ndarray:
    """Unlabelled target images for AdaBN: an npz's image arrays, else the training split."""
    if strategy.unlabelled_uri is None:
        return load_images(dataset_dir, "train")[0]
    from transferkit.data.images import read_unlabelled_npz

    path = storage.fetch_file(strategy.unlabelled_uri, scratch / "unlabelled", config.storage)
    return read_unlabelled_npz(path, strategy.unlabelled_uri)


def _fit_configured(
    config: PipelineConfig, ctx: _Context, scratch: Path
) -> tuple[_Fitted, _Context]:
    """Fit ``config.strategy`` (composite or not); the context the model ended on (domain
    adaptation replaces the backbone)."""
    strategy = config.strategy
    scratch.mkdir(parents=True, exist_ok=True)
    if isinstance(strategy, DomainAdaptationConfig):
        ctx, adaptation = _adapted(config, strategy, ctx, scratch)
        seed_everything(config.training.seed)
        fitted = _fit(config.with_strategy(strategy.then), strategy.then, ctx)
        if ctx.info.modality == "text":
            # MLM moved every encoder weight, whatever the next strategy trains (AdaBN only
            # re-estimates statistics: no parameter is trained).
            fitted.trainable = max(fitted.trainable, ctx.info.parameters + ctx.head_parameters)
        fitted.details = {"adaptation": adaptation, "then": strategy.then.name, **fitted.details}
        return fitted, ctx
    if isinstance(strategy, AutoStrategyConfig):
        return _auto(config, strategy, ctx), ctx
    return _fit(config, strategy, ctx), ctx


def _card(config: PipelineConfig, ctx: _Context, fitted: _Fitted) -> ModelCard:
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
        task="image-classification" if info.image else "text-classification",
        image=info.image,
    )


def _cross_validate(config: PipelineConfig, ctx: _Context, scratch: Path) -> CrossValidation:
    """Fit the strategy once per fold and score each fold's model on its held-out rows,
    through the saved model folder and the evaluation's precision, as evaluate scores."""
    folds = config.training.cross_validation_folds
    assert folds is not None
    metric = config.evaluation.primary_metric
    started = time.perf_counter()
    scores: list[float] = []
    truths, probabilities = [], []
    precision = resolve_precision(config.evaluation.precision, ctx.target)
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
        save_classifier(
            model_dir,
            _card(config, fold_ctx, fitted),
            fitted.head,
            {},
            encoder=fitted.encoder,
            encoder_dir=fold_ctx.backbone_dir / "model",
        )
        tokenizer, model, card = load_classifier(model_dir)
        inputs, truth = load_inputs(fold.dataset_dir, "test")
        proba = predict_proba(
            model.to(ctx.target), tokenizer, card, inputs, config.evaluation.batch_size, precision
        )
        value = score(truth, proba.argmax(axis=1), ctx.labels, proba, positive).metric(metric)
        scores.append(value)
        truths.append(truth)
        probabilities.append(proba)
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
    pooled = score(truth, proba.argmax(axis=1), ctx.labels, proba, positive).metric(metric)
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
    ctx = _Context(
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
        card = _card(config, ctx, fitted)
        if isinstance(strategy, ZeroShotConfig):
            labelled = 0
        elif isinstance(strategy, FewShotConfig):
            labelled = len(fitted.details["examples"])
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
        save_classifier(
            output_dir,
            card,
            fitted.head,
            result.model_dump(),
            encoder=fitted.encoder,
            encoder_dir=ctx.backbone_dir / "model",
        )
    log.info(
        "trained %s: validation %s %.4f (%s trainable parameters)",
        strategy.name,
        result.primary_metric,
        result.validation_metric,
        f"{result.trainable_parameters:,}",
    )
    return result
