"""LogME: agreement with the paper's formulation, and that it ranks real features first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from transferkit import storage
from transferkit.backbones import fetch_backbone
from transferkit.config import PipelineConfig
from transferkit.errors import BackboneError, TrainingError
from transferkit.ranking import logme


def reference_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """Algorithm 1 of You et al. (2021) in its original D × D form, written independently."""
    f = features.astype(np.float64)
    n, d = f.shape
    v, s, vh = np.linalg.svd(f.T @ f)
    evidences = []
    for label in np.unique(labels):
        y = (labels == label).astype(np.float64)
        alpha, beta = 1.0, 1.0
        projected = vh @ (f.T @ y)
        for _ in range(100):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = v @ (projected * beta / (alpha + beta * s))
            alpha_de, beta_de = (m * m).sum(), ((y - f @ m) ** 2).sum()
            new_alpha = gamma / (alpha_de + 1e-5)
            new_beta = (n - gamma) / (beta_de + 1e-5)
            converged = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) <= 1e-3
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.log(alpha + beta * s).sum()
            - beta / 2 * beta_de
            - alpha / 2 * alpha_de
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize(("rows", "dims", "classes"), [(400, 16, 2), (300, 40, 5), (60, 100, 3)])
def test_logme_matches_the_papers_formulation(rows: int, dims: int, classes: int) -> None:
    rng = np.random.default_rng(rows)
    labels = rng.integers(0, classes, rows)
    features = np.eye(classes)[labels] @ rng.normal(size=(classes, dims)) + rng.normal(
        size=(rows, dims)
    )
    assert logme(features, labels) == pytest.approx(reference_logme(features, labels), abs=1e-6)


def test_logme_prefers_informative_features() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    signal = np.eye(2)[labels] @ rng.normal(size=(2, 32))
    informative = logme(signal + rng.normal(size=(500, 32)), labels)
    noise = logme(rng.normal(size=(500, 32)), labels)
    assert informative > noise + 0.1


def test_logme_ranks_the_pretrained_encoder_above_a_random_one(probe_run: tuple) -> None:
    """Real SST-2 features from MiniLM against the same architecture, randomly initialised."""
    import torch

    from transferkit.backbones import load_backbone_info
    from transferkit.backbones.encoder import random_text_encoder
    from transferkit.backbones.text import run_batched
    from transferkit.data import load_split
    from transferkit.features import load_features

    _, folder, _ = probe_run
    texts, labels = load_split(folder / "dataset", "train")
    pretrained = load_features(folder / "features", "train")[:600]
    info = load_backbone_info(folder / "backbone")
    torch.manual_seed(0)
    tokenizer, encoder = random_text_encoder(folder / "backbone" / "model", info.pooling, False)
    random_features = run_batched(encoder.eval(), tokenizer, texts[:600], 64, 64, "fp32", "embed")
    assert logme(pretrained, labels[:600]) > logme(random_features, labels[:600]) + 0.05


def test_logme_refuses_a_single_label() -> None:
    with pytest.raises(TrainingError, match="at least two labels"):
        logme(np.ones((10, 3)), np.zeros(10))


def test_fetch_ranks_candidates_and_keeps_the_best(
    probe_run: tuple, tiny_backbone: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    config, folder, _ = probe_run
    data = config.model_dump()
    data["backbone_selection"] = {
        "candidates": [{"uri": str(tiny_backbone)}, {"uri": str(minilm_dir)}],
        "examples_per_class": 100,
    }
    ranked = PipelineConfig.model_validate(data)
    info = fetch_backbone(ranked, tmp_path / "backbone", folder / "dataset")
    ranking = storage.read_json(tmp_path / "backbone" / "ranking.json")
    assert [c["uri"] for c in ranking["candidates"]] == [str(minilm_dir), str(tiny_backbone)]
    assert ranking["selected"] == f"{minilm_dir} (mean pooling)"
    assert ranking["candidates"][0]["logme"] > ranking["candidates"][1]["logme"]
    assert all(c["rows"] == 200 for c in ranking["candidates"])
    assert info.source == str(minilm_dir)
    assert info.parameters == 22_713_216
    assert (tmp_path / "backbone" / "model" / "model.safetensors").is_file()
    # Only the winner is kept: no candidate folders are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]
    with pytest.raises(BackboneError, match="no dataset"):
        fetch_backbone(ranked, tmp_path / "other")
