"""LogME: agreement with the paper's formulation, and that it ranks real features first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_config, stsb_subset
from transferkit import storage
from transferkit.backbones import fetch_backbone
from transferkit.config import PipelineConfig
from transferkit.data.sampling import sample_rows
from transferkit.errors import BackboneError, TrainingError
from transferkit.ranking import logme
from transferkit.step_inputs import as_step


def reference_evidence(f: np.ndarray, y: np.ndarray) -> float:
    """Algorithm 1 of You et al. (2021) for one target column, in its original D × D form,
    written independently: the maximum log evidence per row."""
    n, d = f.shape
    v, s, vh = np.linalg.svd(f.T @ f)
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
    return float(evidence / n)


def reference_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The paper's LogME of class ids: the mean evidence of the one-hot columns."""
    f = features.astype(np.float64)
    return float(
        np.mean(
            [reference_evidence(f, (labels == c).astype(np.float64)) for c in np.unique(labels)]
        )
    )


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
    with pytest.raises(TrainingError, match=r"at least two labels.*examples_per_class"):
        logme(np.ones((10, 3)), np.zeros(10, dtype=np.int64))


def test_logme_of_label_sets_and_scores_is_the_paper_s_evidence_of_their_columns() -> None:
    rng = np.random.default_rng(7)
    features = rng.normal(size=(300, 24))
    weights = rng.normal(size=(24, 4))
    sets = features @ weights + rng.normal(size=(300, 4)) > 1.0
    expected = np.mean([reference_evidence(features, c.astype(np.float64)) for c in sets.T])
    assert logme(features, sets) == pytest.approx(expected, abs=1e-6)
    # A label no sampled row carries (or every row does) says nothing about the features.
    padded = np.column_stack([sets, np.zeros(300, bool), np.ones(300, bool)])
    assert logme(features, padded) == pytest.approx(expected, abs=1e-9)
    scores = 2.5 + features @ weights[:, 0] + rng.normal(size=300)
    standard = (scores - scores.mean()) / scores.std()
    assert logme(features, scores) == pytest.approx(
        reference_evidence(features, standard), abs=1e-6
    )
    # Informative features explain the scores better than noise does.
    assert logme(features, scores) > logme(rng.normal(size=(300, 24)), scores) + 0.1
    with pytest.raises(TrainingError, match="carry and some do not"):
        logme(features, np.zeros((300, 3), bool))
    with pytest.raises(TrainingError, match="different scores"):
        logme(features, np.full(300, 2.0))


def test_samples_of_label_sets_and_scores_keep_every_label_and_range() -> None:
    rng = np.random.default_rng(3)
    sets = rng.random((2000, 6)) < np.array([0.3, 0.1, 0.05, 0.01, 0.2, 0.004])
    rows = sample_rows(sets, 20, seed=5, names=[str(i) for i in range(6)])
    carried = sets[rows].sum(axis=0)
    available = sets.sum(axis=0)
    assert (carried >= np.minimum(20, available)).all()  # every label, all of a rare one
    assert carried[3] == available[3]
    assert carried[5] == available[5]
    assert len(rows) < 6 * 20  # a row counts for every label it carries
    assert len(np.unique(rows)) == len(rows)
    np.testing.assert_array_equal(rows, sample_rows(sets, 20, 5, [str(i) for i in range(6)]))
    assert not np.array_equal(rows, sample_rows(sets, 20, 6, [str(i) for i in range(6)]))
    scores = rng.exponential(size=3000)  # skewed: a top decile far above the rest
    chosen = scores[sample_rows(scores, 15, seed=0, names=["score"])]
    assert len(chosen) == 150
    deciles = np.quantile(scores, np.linspace(0, 1, 11))
    counts, _ = np.histogram(chosen, bins=deciles)
    assert (counts == 15).all()


def test_fetch_ranks_candidates_for_scores_of_text_pairs(
    tiny_backbone: Path, minilm_dir: Path, tmp_path: Path, shared_data: Path
) -> None:
    from transferkit.data import ingest_data

    data = stsb_subset(tmp_path, shared_data, {"train": 400, "validation": 100, "test": 50})
    config = make_config(
        tmp_path,
        data,
        task="regression",
        backbone_selection={
            "candidates": [{"uri": str(tiny_backbone)}, {"uri": str(minilm_dir)}],
            "examples_per_class": 20,
        },
    )
    ingest_data(as_step(config, "ingest_data"), tmp_path / "dataset")
    # As the pipeline's step runs it: on its part of the config only.
    fetching = as_step(config, "fetch_backbone")
    info = fetch_backbone(fetching, tmp_path / "backbone", tmp_path / "dataset")
    ranking = storage.read_json(tmp_path / "backbone" / "ranking.json")
    # The pre-trained encoder's pair features explain the similarity scores; a random
    # encoder's do not.
    assert [c["uri"] for c in ranking["candidates"]] == [str(minilm_dir), str(tiny_backbone)]
    assert ranking["candidates"][0]["logme"] > ranking["candidates"][1]["logme"] + 0.05
    assert all(c["rows"] == 200 for c in ranking["candidates"])  # 20 from each decile
    assert info.source == str(minilm_dir)


def test_fetch_ranks_candidates_and_keeps_the_best(
    probe_run: tuple, tiny_backbone: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    config, folder, _ = probe_run
    data = config.model_dump()
    data["backbone_selection"] = {
        "candidates": [{"uri": str(tiny_backbone)}, {"uri": str(minilm_dir)}],
        "examples_per_class": 100,
    }
    ranked = as_step(PipelineConfig.model_validate(data), "fetch_backbone")
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
