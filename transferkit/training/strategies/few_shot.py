"""few_shot: SetFit on k examples per label — contrastive tuning of the encoder on pairs of
them, then a logistic-regression head on the tuned embeddings (``training.few_shot``).
Label sets (task: multi_label): rows drawn until every label is carried by k of them, SetFit's
multi-label pairs, and one logistic regression per label (one-vs-rest)."""

from __future__ import annotations

import logging

import numpy as np

from transferkit.config import FEW_SHOT_K, FewShotConfig, PipelineConfig
from transferkit.data.sampling import require_examples, sample_rows
from transferkit.training.context import Context, Fitted
from transferkit.training.few_shot import contrastive_tune, make_pairs, sample_per_class
from transferkit.training.probe import fit_probe
from transferkit.training.runtime import device
from transferkit.training.strategies import register
from transferkit.training.zero_shot import label_prompts

log = logging.getLogger(__name__)


@register("few_shot")
def fit(config: PipelineConfig, strategy: FewShotConfig, ctx: Context) -> Fitted:
    labels = ctx.labels
    modality = ctx.modality
    texts, truth = modality.load(ctx.dataset_dir, "train")
    pool = np.arange(len(truth)) if ctx.rows is None else ctx.rows
    # k is the label budget: ``rows`` holds up to k of every label, drawn with the same seed,
    # so this takes all of them, and refuses a label that has fewer than k.
    k = config.training.examples_per_class or FEW_SHOT_K
    sets = truth.ndim == 2
    if sets:  # the budget's rows (drawn by sample_rows), once each label has k carriers
        chosen = (
            ctx.rows
            if ctx.rows is not None
            else sample_rows(truth, k, config.training.seed, labels)
        )
        require_examples(truth[chosen].sum(axis=0), k, labels)
    else:
        chosen = pool[sample_per_class(truth[pool], k, config.training.seed, labels)]
    shots, shot_labels = [texts[i] for i in chosen], truth[chosen]
    if strategy.templates:
        prompts = label_prompts(strategy, labels, ctx.label_map.values)
        for label, templated in enumerate(prompts):
            shots += templated
            if sets:  # each templated example carries its one label
                one = np.zeros((len(templated), len(labels)), dtype=bool)
                one[:, label] = True
                shot_labels = np.concatenate([shot_labels, one])
            else:
                shot_labels = np.concatenate([shot_labels, np.full(len(templated), label)])
    tokenizer, encoder = ctx.load_encoder()
    encoder.to(device())
    pairs = make_pairs(
        shot_labels, strategy.pair_iterations, np.random.default_rng(config.training.seed)
    )
    max_length = ctx.info.max_length
    tuning = contrastive_tune(encoder, tokenizer, shots, pairs, strategy, max_length, ctx.precision)
    batch = config.evaluation.batch_size
    val_texts, val_truth = modality.load(ctx.dataset_dir, "validation")

    def embed(inputs: list[str], what: str) -> np.ndarray:
        return modality.run(encoder, tokenizer, inputs, ctx.info, batch, ctx.precision, what)

    head, probe = fit_probe(
        embed(shots, "embed shots"),
        shot_labels,
        embed(val_texts, "embed validation"),
        val_truth,
        labels,
        [strategy.head_l2],
        300,
        config.evaluation.primary_metric,
        standardize=False,
        class_weights=ctx.class_weights,
    )
    log.info(
        "few-shot: %d examples + %d templated, %d pairs, loss %.3f → %.3f, validation %.4f",
        len(chosen),
        len(shots) - len(chosen),
        len(pairs),
        tuning["first_loss"],
        tuning["last_loss"],
        probe.validation_metric,
    )
    details = {
        "examples": chosen.tolist(),
        "templated_examples": shots[len(chosen) :],
        "tuning": tuning,
        "head": probe.model_dump(),
    }
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    return Fitted(
        head,
        probe.validation_metric,
        trainable + ctx.head_parameters,
        details,
        (tokenizer, encoder),
        labelled=len(chosen),
    )
