"""Zero-shot classification: no labelled training, only label descriptions.

Each label's descriptions are put into every prompt template, embedded with the frozen
backbone, L2-normalised and averaged into one prototype. A text's class is the prototype with
the highest cosine similarity. That is exactly a linear head on normalised sentence vectors
(weights = scale × prototypes, bias 0), so the result is saved, evaluated, registered and
served like every other strategy.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.backbones.text import run_batched
from transferkit.config import FewShotConfig, ZeroShotConfig
from transferkit.errors import TrainingError

log = logging.getLogger(__name__)


def label_prompts(
    strategy: ZeroShotConfig | FewShotConfig,
    names: list[str],
    values: list[str],
) -> list[list[str]]:
    """The prompts of every label: each template filled with each of its descriptions.

    Raises:
        TrainingError: ``label_texts`` names something that is not a label.
    """
    texts = strategy.label_texts or {}
    known = set(names) | set(values)
    stray = sorted(set(texts) - known)
    if stray:
        raise TrainingError(
            f"strategy.label_texts names {', '.join(map(repr, stray))}, not a label (labels: "
            f"{', '.join(names)}); key it by label name or value"
        )
    prompts = []
    for name, value in zip(names, values, strict=True):
        descriptions = texts.get(name) or texts.get(value) or [name]
        prompts.append([t.format(d) for t in strategy.templates for d in descriptions])
    return prompts


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def zero_shot_head(
    tokenizer: Any,
    encoder: nn.Module,
    strategy: ZeroShotConfig,
    names: list[str],
    values: list[str],
    max_length: int,
    precision: str,
) -> tuple[nn.Linear, np.ndarray]:
    """The cosine head and the unit prototypes [labels, hidden]."""
    prototypes = []
    for label, prompts in zip(names, label_prompts(strategy, names, values), strict=True):
        vectors = unit(
            run_batched(
                encoder,
                tokenizer,
                prompts,
                max_length,
                64,
                precision,
                description=f"embed prompts of {label}",
            )
        )
        prototypes.append(vectors.mean(axis=0))
    matrix = unit(np.stack(prototypes))
    head = nn.Linear(matrix.shape[1], len(names))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(matrix * strategy.scale))
        head.bias.zero_()
    return head, matrix


def prototype_similarities(features: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row to every label prototype [rows, labels]."""
    return unit(features) @ prototypes.T
