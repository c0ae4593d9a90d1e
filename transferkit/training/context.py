"""What every strategy reads (``Context``) and what fitting one produces (``Fitted``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.backbones import BackboneInfo
from transferkit.backbones.base import Capabilities, Family, folder_family, read_config
from transferkit.backbones.modality import Modality, modality_of
from transferkit.config import LinearProbeConfig, PipelineConfig
from transferkit.data import LabelMap, load_labels
from transferkit.data.dataset import has_pairs
from transferkit.data.sampling import sample_rows
from transferkit.features import load_features
from transferkit.training.distributed import Layout
from transferkit.training.probe import ProbeFit, fit_probe
from transferkit.training.ridge import RidgeFit, fit_ridge


@dataclass
class Fitted:
    """What fitting one strategy produced, before it is saved."""

    head: nn.Linear
    validation_metric: float
    trainable: int
    details: dict[str, Any]
    encoder: tuple[Any, Any] | None = None  # (processor, encoder) when the encoder changed
    normalize: bool | None = None  # the head's input normalisation, when it differs
    labelled: int | None = None  # labelled examples it read, when not the label budget's rows
    context: Context | None = None  # the context the model ended on, when it changed it
    cross_encoder: bool = False  # text pairs tokenised together through the trained encoder


@dataclass
class Context:
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
    scratch: Path | None = None  # a working folder of this fit, removed after it
    class_weights: np.ndarray | None = None  # loss weight per label id; None: all the same

    @property
    def labels(self) -> list[str]:
        return self.label_map.names

    @property
    def pairs(self) -> bool:
        """Whether each row holds two texts (data.text_pair_column)."""
        return has_pairs(self.dataset_dir)

    @property
    def head_parameters(self) -> int:
        width = self.info.hidden_size * (4 if self.pairs else 1)  # a pair's four blocks
        return (width + 1) * len(self.label_map)

    @property
    def model_dir(self) -> Path:
        return self.backbone_dir / "model"

    @property
    def family(self) -> Family:
        return folder_family(self.model_dir, self.info.family)

    @property
    def modality(self) -> Modality:
        return modality_of(self.info.modality)

    def capabilities(self) -> Capabilities:
        """What the backbone's family can do with this data."""
        return self.family.capabilities(self.info.modality, read_config(self.model_dir))

    def train_split(self) -> tuple[Any, np.ndarray]:
        """Training inputs and labels within the label budget."""
        inputs, truth = self.modality.load(self.dataset_dir, "train")
        if self.rows is None:
            return inputs, truth
        return self.modality.subset(inputs, self.rows), truth[self.rows]

    def load_encoder(self, random_init: bool = False) -> tuple[Any, Any]:
        """The backbone's processor and encoder (fp32, CPU) for this data."""
        return self.family.load(self.model_dir, self.info.modality, self.info, random_init)


def budget_rows(config: PipelineConfig, dataset_dir: Path, labels: list[str]) -> np.ndarray | None:
    """Training rows within the label budget (``training.examples_per_class``); None: all.

    Drawn with ``training.seed`` by ``sample_rows`` (k per class; label sets until each label
    has k carriers; scores k per decile), so the same config trains on the same rows, and a
    few_shot branch with k equal to the budget uses exactly these rows.
    """
    k = config.training.examples_per_class
    if k is None:
        return None
    return sample_rows(load_labels(dataset_dir, "train"), k, config.training.seed, labels)


def fit_linear_probe(
    config: PipelineConfig, probe: LinearProbeConfig, ctx: Context
) -> tuple[nn.Linear, ProbeFit | RidgeFit]:
    """Fit the linear probe on the cached train features, selecting L2 on validation (task:
    regression: the ridge, selecting its penalty)."""
    train_y = load_labels(ctx.dataset_dir, "train")
    features = load_features(ctx.features_dir, "train")
    rows = ctx.rows
    if config.task == "regression":
        return fit_ridge(
            features if rows is None else features[rows],
            train_y if rows is None else train_y[rows],
            load_features(ctx.features_dir, "validation"),
            load_labels(ctx.dataset_dir, "validation"),
            probe.ridge_alphas,
            config.evaluation.primary_metric,
            overwrite=True,  # both matrices were loaded for this fit alone
        )
    return fit_probe(
        features if rows is None else features[rows],
        train_y if rows is None else train_y[rows],
        load_features(ctx.features_dir, "validation"),
        load_labels(ctx.dataset_dir, "validation"),
        ctx.labels,
        probe.l2_grid,
        probe.max_iter,
        config.evaluation.primary_metric,
        class_weights=ctx.class_weights,
        overwrite=True,  # both matrices were loaded for this fit alone
    )
