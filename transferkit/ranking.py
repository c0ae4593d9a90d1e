"""Rank candidate backbones before any training, by LogME on their frozen features.

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021) is the log marginal evidence of a Bayesian linear model from the
features to one-hot labels (label sets: each label's 0/1 column; scores: the standardised
score, as the paper treats regression), maximised over its prior and noise precisions and
averaged over labels and rows. Higher means the labels are easier to explain linearly from
the features, which correlates with accuracy after fine-tuning. It costs one SVD of the
feature matrix, so a few thousand rows rank a backbone in seconds.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.errors import TrainingError

log = logging.getLogger(__name__)

_EPSILON = 1e-5


def _class_evidence(
    sigma: np.ndarray, projected: np.ndarray, residual: float, rows: int, dims: int
) -> float:
    """Maximum evidence of one label column, in the SVD basis of the features.

    Args:
        sigma: squared singular values of the feature matrix (its rank k entries).
        projected: the label column in the left singular basis (k entries).
        residual: squared norm of the label column outside the span of the features.
        rows: N, the number of rows.
        dims: D, the feature dimension.
    """
    alpha, beta = 1.0, 1.0
    p2 = projected**2
    for _ in range(100):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * p2 / (t + sigma) ** 2).sum())
        res2 = float((p2 / (1 + sigma / t) ** 2).sum()) + residual
        alpha = gamma / (m2 + _EPSILON)
        beta = (rows - gamma) / (res2 + _EPSILON)
        if abs(alpha / beta - t) / t <= 1e-3:
            break
    rank = len(sigma)
    evidence = (
        dims / 2 * math.log(alpha)
        + rows / 2 * math.log(beta)
        - 0.5 * float(np.log(alpha + beta * sigma).sum())
        - 0.5 * (dims - rank) * math.log(alpha)
        - beta / 2 * res2
        - alpha / 2 * m2
        - rows / 2 * math.log(2 * math.pi)
    )
    return evidence / rows


def _targets(labels: np.ndarray) -> np.ndarray:
    """The columns LogME explains [rows, columns]: one-hot class ids, the label-set columns
    that have both carriers and non-carriers in the sample, or the standardised score.

    Raises:
        TrainingError: the sample holds nothing to explain (one label, no label present and
            absent, constant scores) or fewer rows than columns.
    """
    fix = "raise backbone_selection.examples_per_class"
    if labels.ndim == 2:
        carried = labels.sum(axis=0)
        keep = (carried > 0) & (carried < len(labels))
        if not keep.any():
            raise TrainingError(
                f"LogME needs a label that some sampled rows carry and some do not (got "
                f"{len(labels)} rows); {fix}"
            )
        return labels[:, keep].astype(np.float64)
    if labels.dtype.kind == "f":
        if len(labels) < 3 or np.ptp(labels) == 0:
            raise TrainingError(
                f"LogME needs at least three rows of different scores (got {len(labels)} "
                f"rows, {len(np.unique(labels))} distinct); {fix}"
            )
        return ((labels - labels.mean()) / labels.std())[:, None]
    classes = np.unique(labels)
    if len(classes) < 2 or len(labels) <= len(classes):
        raise TrainingError(
            f"LogME needs rows of at least two labels (got {len(labels)} rows, {len(classes)} "
            f"labels); {fix}"
        )
    return (labels[:, None] == classes[None, :]).astype(np.float64)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` (N × D) for a task's labels: integer class ids (N,), a boolean
    label-set matrix (N × L) or float scores (N,); the mean evidence per explained column
    (one per class, per label, or the score).

    Raises:
        TrainingError: nothing to explain in ``labels`` (see ``_targets``).
    """
    x = np.asarray(features, dtype=np.float64)
    targets = _targets(np.asarray(labels))
    rows, dims = x.shape
    u, singular, _ = np.linalg.svd(x, full_matrices=False)
    keep = singular > 1e-10 * max(float(singular.max()), 1e-30)
    u, sigma = u[:, keep], singular[keep] ** 2
    evidences = []
    for column in targets.T:
        projected = u.T @ column
        residual = max(float(column @ column - projected @ projected), 0.0)
        evidences.append(_class_evidence(sigma, projected, residual, rows, dims))
    return float(np.mean(evidences))


class CandidateScore(BaseModel):
    """One ranked backbone."""

    uri: str
    pooling: str
    normalize: bool
    logme: float
    architecture: str
    parameters: int
    fingerprint: str
    rows: int
    seconds: float


class Ranking(BaseModel):
    """Every candidate's LogME, best first; the first one was fetched."""

    candidates: list[CandidateScore]
    selected: str  # "<uri> (<pooling> pooling)"


def rank_backbones(
    config: PipelineConfig,
    dataset_dir: Path,
    output_dir: Path,
    fetch: Callable[[PipelineConfig, Path], Any],
) -> Ranking:
    """Fetch every candidate of ``config.backbone_selection``, score it, keep the best.

    Each candidate embeds the same seeded sample of training rows (``examples_per_class`` per
    label; ``transferkit.data.sampling.sample_rows`` for label sets and scores) with its
    frozen encoder (text pairs: their pair features, what the probe reads); LogME scores the
    embeddings against the labels. The winner
    becomes ``output_dir`` (a fetch_backbone artifact) with ``ranking.json`` beside its
    ``backbone.json``.

    Args:
        fetch: fetches one backbone config into a folder and returns its BackboneInfo
            (fetch_backbone's own single-backbone fetch).

    Raises:
        BackboneError, StorageError: a candidate cannot be fetched (named in the message).
    """
    from transferkit.backbones.base import folder_family
    from transferkit.backbones.modality import modality_of
    from transferkit.data import load_label_map
    from transferkit.data.sampling import sample_rows
    from transferkit.devices import device, resolve_precision

    selection = config.backbone_selection
    assert selection is not None
    modality = modality_of(config.data.modality)
    inputs, truth = modality.load(dataset_dir, "train")
    labels = load_label_map(dataset_dir).names
    rows = sample_rows(truth, selection.examples_per_class, config.data.split.seed, labels)
    sample, sample_labels = modality.subset(inputs, rows), truth[rows]
    target = device()
    precision = resolve_precision(config.training.precision, target)
    scores: list[tuple[CandidateScore, Path]] = []
    with tempfile.TemporaryDirectory(prefix="transferkit-rank-", dir=output_dir.parent) as tmp:
        for index, candidate in enumerate(selection.candidates):
            started = time.perf_counter()
            folder = Path(tmp) / f"candidate-{index}"
            single = config.model_copy(update={"backbone": candidate, "backbone_selection": None})
            info = fetch(single, folder)
            family = folder_family(folder / "model", info.family)
            processor, encoder = family.load(folder / "model", info.modality, info)
            features = modality.run(
                encoder.to(target).eval(),
                processor,
                sample,
                info,
                config.evaluation.batch_size,
                precision,
                f"embed for LogME ({index + 1}/{len(selection.candidates)})",
            )
            value = logme(features, sample_labels)
            log.info(
                "LogME %.4f  %s (%s, %s pooling)",
                value,
                candidate.uri,
                info.architecture,
                info.pooling,
            )
            scores.append(
                (
                    CandidateScore(
                        uri=candidate.uri,
                        pooling=info.pooling,
                        normalize=info.normalize,
                        logme=round(value, 6),
                        architecture=info.architecture,
                        parameters=info.parameters,
                        fingerprint=info.fingerprint,
                        rows=len(rows),
                        seconds=round(time.perf_counter() - started, 2),
                    ),
                    folder,
                )
            )
            del encoder
        scores.sort(key=lambda item: -item[0].logme)
        top = scores[0][0]
        ranking = Ranking(
            candidates=[s for s, _ in scores], selected=f"{top.uri} ({top.pooling} pooling)"
        )
        best = scores[0][1]
        storage.write_json(best / "ranking.json", ranking.model_dump())
        with storage.atomic_dir(output_dir) as out:
            shutil.copytree(best, out, dirs_exist_ok=True)
    log.info("selected backbone %s (LogME %.4f)", ranking.selected, top.logme)
    return ranking
