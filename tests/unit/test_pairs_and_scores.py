"""task: regression and text pairs through the library steps on real STS Benchmark pairs and
the real MiniLM: ingest (scores stratified by quantile, pairs kept together), pair features,
the zero-shot cosine, the ridge probe, evaluation, the served model and the champion test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from tests.conftest import make_config, stsb_subset
from transferkit import storage
from transferkit.backbones.text import pair_features
from transferkit.config import PipelineConfig
from transferkit.data import TextPairs, ingest_data, load_labels, load_split
from transferkit.data.dataset import load_text_inputs
from transferkit.errors import DataError
from transferkit.features import load_features
from transferkit.metrics import paired_comparison
from transferkit.serving import predictions_frame
from transferkit.training.model import CARD, load_classifier, predict_proba

ROWS = {"train": 600, "validation": 200, "test": 240}


def _config(folder: Path, data: dict[str, Any], strategy: str) -> PipelineConfig:
    return make_config(
        folder,
        data,
        task="regression",
        strategy={"name": strategy},
        registry={"model_name": "stsb-test"},
    )


@pytest.fixture(scope="module")
def stsb(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    """Dataset, backbone and features of the STS-B subset; both strategies trained and
    evaluated on them."""
    from transferkit.backbones import fetch_backbone
    from transferkit.evaluation import evaluate
    from transferkit.features import extract_features
    from transferkit.training import train

    tmp = tmp_path_factory.mktemp("stsb")
    data = stsb_subset(tmp, shared_data, ROWS)
    config = _config(tmp, data, "linear_probe")
    ingest_data(config, tmp / "dataset")
    fetch_backbone(config, tmp / "backbone")
    extract_features(config, tmp / "dataset", tmp / "backbone", tmp / "features")
    out: dict[str, Any] = {"folder": tmp, "data": data}
    for strategy in ("linear_probe", "zero_shot"):
        strategy_config = _config(tmp, data, strategy)
        model, evaluation = tmp / f"{strategy}-model", tmp / f"{strategy}-evaluation"
        result = train(strategy_config, tmp / "dataset", tmp / "backbone", tmp / "features", model)
        scored = evaluate(strategy_config, tmp / "dataset", model, evaluation)
        out[strategy] = {"config": strategy_config, "train": result, "evaluation": scored}
    return out


def test_pairs_and_scores_are_stored_with_their_targets(stsb: dict[str, Any]) -> None:
    dataset = stsb["folder"] / "dataset"
    frame = pd.read_parquet(dataset / "test.parquet")
    assert list(frame.columns) == ["text", "text_pair", "label"]
    assert frame["label"].dtype == np.float64
    assert frame.iloc[0].tolist() == [
        "A girl is styling her hair.",
        "A girl is brushing her hair.",
        2.5,
    ]
    pairs, scores = load_text_inputs(dataset, "test")
    assert isinstance(pairs, TextPairs)
    assert len(pairs) == ROWS["test"]
    assert scores.dtype == np.float64
    assert 0 <= scores.min() < scores.max() <= 5
    stats = storage.read_json(dataset / "stats.json")
    assert stats["task"] == "regression"
    assert stats["pairs"] is True
    assert stats["class_balance"] == {}
    assert stats["targets"]["test"]["rows"] == ROWS["test"]
    assert stats["targets"]["test"]["mean"] == pytest.approx(scores.mean(), abs=1e-5)
    # load_split promises single texts: a pair dataset is refused, not half-read.
    with pytest.raises(DataError, match="text pairs"):
        load_split(dataset, "test")


def test_pair_features_are_both_unit_embeddings_and_their_products(stsb: dict[str, Any]) -> None:
    features = load_features(stsb["folder"] / "features", "test")
    assert features.shape == (ROWS["test"], 4 * 384)
    u, v, gap, product = np.split(features, 4, axis=1)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1, atol=1e-4)
    np.testing.assert_allclose(gap, np.abs(u - v), atol=1e-6)
    np.testing.assert_allclose(product, u * v, atol=1e-6)
    # pair_features normalises whatever scale the encoder gives.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(pair_features(3 * a, b)[:, 24:].sum(1), cosine, rtol=1e-5)


def _reference_cosines(minilm_dir: Path, pairs: TextPairs) -> np.ndarray:
    """The two texts' cosine by transformers alone (mean pooling, MiniLM's recipe)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)

    return (embed(pairs.first) * embed(pairs.second)).sum(1).numpy()


def test_zero_shot_is_the_cosine_of_the_two_embeddings(
    stsb: dict[str, Any], minilm_dir: Path
) -> None:
    run = stsb["zero_shot"]
    assert run["train"].labelled_examples == 0
    assert run["train"].trainable_parameters == 0
    pairs, truth = load_text_inputs(stsb["folder"] / "dataset", "test")
    assert isinstance(pairs, TextPairs)
    cosine = _reference_cosines(minilm_dir, pairs)
    predicted = pd.read_parquet(stsb["folder"] / "zero_shot-evaluation" / "predictions.parquet")
    # The served score is the cosine put on the training targets' range (0-5 here).
    low, high = run["train"].details["low"], run["train"].details["high"]
    np.testing.assert_allclose(predicted["predicted"], low + (high - low) * cosine, atol=2e-3)
    expected = spearmanr(cosine, truth).statistic
    assert run["evaluation"].primary_value == pytest.approx(expected, abs=2e-3)
    assert run["evaluation"].primary_value > 0.75  # MTEB: 0.82 on the whole test split


def test_the_ridge_probe_learns_the_scores(stsb: dict[str, Any]) -> None:
    run = stsb["linear_probe"]
    details = run["train"].details
    assert f"{details['alpha']:g}" in details["grid"]
    assert details["validation_metric"] == max(details["grid"].values())
    scores = run["evaluation"].scores
    # 600 training pairs: far better than predicting the mean (R² 0), ranks like the cosine.
    assert scores.r2 > 0.3
    assert scores.spearman > 0.6
    assert scores.rmse < load_labels(stsb["folder"] / "dataset", "test").std()
    evaluation = stsb["folder"] / "linear_probe-evaluation"
    assert (evaluation / "scores.png").stat().st_size > 1000
    assert not (evaluation / "confusion_matrix.png").exists()
    report = (evaluation / "report.md").read_text()
    assert "Spearman" in report
    assert "| targets |" in report
    assert run["evaluation"].kfp_metrics()["rmse"] == pytest.approx(scores.rmse)


def test_the_saved_model_serves_pairs_and_refuses_single_texts(stsb: dict[str, Any]) -> None:
    model_dir = stsb["folder"] / "linear_probe-model"
    tokenizer, model, card = load_classifier(model_dir)
    assert card.regression
    assert card.pair
    assert card.labels == ["score"]
    assert model.head.in_features == 4 * 384
    assert model.head.out_features == 1
    test = pd.read_parquet(stsb["folder"] / "dataset" / "test.parquet")
    request = pd.DataFrame({"text": test["text"][:16], "text_pair": test["text_pair"][:16]})
    frame = predictions_frame(
        predict_proba(model, tokenizer, card, request), card.labels, None, True
    )
    assert list(frame.columns) == ["score"]
    evaluated = pd.read_parquet(stsb["folder"] / "linear_probe-evaluation" / "predictions.parquet")
    np.testing.assert_allclose(frame["score"], evaluated["predicted"][:16], atol=1e-4)
    with pytest.raises(ValueError, match="text_pair"):
        predict_proba(model, tokenizer, card, pd.DataFrame({"text": ["one text"]}))


def test_classification_cards_keep_their_fields(stsb: dict[str, Any], probe_run: tuple) -> None:
    # A classifier's card has no regression/pair keys: its fingerprint stays as it was.
    _, artifacts, _ = probe_run
    card = storage.read_json(artifacts / "model" / CARD)
    assert "regression" not in card
    assert "pair" not in card
    pair_card = storage.read_json(stsb["folder"] / "linear_probe-model" / CARD)
    assert pair_card["regression"] is True
    assert pair_card["pair"] is True
    assert pair_card["task"] == "text-regression"
    tokenizer, model, card_model = load_classifier(artifacts / "model")
    with pytest.raises(ValueError, match="one text per row"):
        predict_proba(
            model, tokenizer, card_model, pd.DataFrame({"text": ["a"], "text_pair": ["b"]})
        )


def test_a_lower_error_is_a_gain_for_the_champion_test() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 5, 400)
    better = (truth + rng.normal(0, 0.3, 400))[:, None]
    worse = (truth + rng.normal(0, 0.9, 400))[:, None]
    for metric in ("rmse", "mae", "spearman", "r2"):
        up = paired_comparison(truth, better, worse, ["score"], metric, "bootstrap", 0.05, 300)
        down = paired_comparison(truth, worse, better, ["score"], metric, "bootstrap", 0.05, 300)
        assert (up.gain > 0, up.p_value < 0.05, up.ci_low > 0) == (True, True, True), metric
        assert (down.gain < 0, down.p_value > 0.95) == (True, True), metric
    rmse = paired_comparison(truth, better, worse, ["score"], "rmse", "bootstrap", 0.05, 100)
    assert rmse.challenger < rmse.champion  # the values as measured, the gain signed


def test_scores_are_split_in_proportion(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    # A skewed target: most rows near 0, a long tail to 10.
    scores = np.round(rng.exponential(1.5, 2000).clip(0, 10), 3)
    frame = pd.DataFrame({"sentence": [f"text {i}" for i in range(2000)], "score": scores})
    frame.to_csv(tmp_path / "all.csv", index=False)
    config = make_config(
        tmp_path,
        {"uri": str(tmp_path / "all.csv"), "label_column": "score"},
        task="regression",
    )
    assert config.evaluation.primary_metric == "rmse"  # auto: no pairs
    result = ingest_data(config, tmp_path / "dataset")
    assert result.targets is not None
    quantiles = {
        split: np.quantile(load_labels(tmp_path / "dataset", split), [0.25, 0.5, 0.9])
        for split in ("train", "validation", "test")
    }
    for split in ("validation", "test"):
        np.testing.assert_allclose(quantiles[split], quantiles["train"], rtol=0.1, atol=0.05)


def test_constant_targets_are_refused(tmp_path: Path) -> None:
    frame = pd.DataFrame({"sentence": [f"t{i}" for i in range(100)], "score": [3.0] * 100})
    frame.to_csv(tmp_path / "all.csv", index=False)
    config = make_config(
        tmp_path, {"uri": str(tmp_path / "all.csv"), "label_column": "score"}, task="regression"
    )
    with pytest.raises(DataError, match=r"every training target .* is 3"):
        ingest_data(config, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"strategy": {"name": "few_shot"}}, "does not train task 'regression'"),
        ({"evaluation": {"primary_metric": "accuracy"}}, "judges classes"),
        ({"training": {"class_weights": "balanced"}}, "decides between labels"),
        ({"training": {"decision_threshold": "tuned"}}, "decides between labels"),
        ({"registry": {"gate": "mcnemar"}}, "use bootstrap"),
        ({"evaluation": {"positive_label": "1"}}, "names classes"),
        ({"data_extra": {"label_names": {"0": "low"}}}, "names classes"),
        ({"task": "classification", "evaluation": {"primary_metric": "rmse"}}, "judges scores"),
        ({"strategy": {"name": "zero_shot"}, "no_pairs": True}, "zero_shot"),
        ({"task": "classification", "strategy": {"name": "few_shot"}}, "does not train on text"),
        ({"data_extra": {"text_pair_column": "sentence"}}, "names the text column"),
        (
            {"trigger": {"drift": {"uri": "r.csv", "text_pair_column": "b"}}, "no_pairs": True},
            "the model reads single texts",
        ),
    ],
)
def test_regression_and_pair_settings_are_checked_at_validate(
    raw: dict[str, Any], message: str
) -> None:
    data: dict[str, Any] = {
        "train_uri": "a.tsv",
        "test_uri": "b.tsv",
        "text_column": "sentence",
        "text_pair_column": "sentence2",
        **raw.pop("data_extra", {}),
    }
    if raw.pop("no_pairs", False):
        data.pop("text_pair_column")
    with pytest.raises(ValueError, match=message):
        PipelineConfig.model_validate({"task": "regression", "data": data, **raw})


def test_defaults_follow_the_task() -> None:
    data = {"train_uri": "a.tsv", "test_uri": "b.tsv", "text_pair_column": "s2"}
    config = PipelineConfig.model_validate({"task": "regression", "data": data})
    assert config.evaluation.primary_metric == "spearman"
    assert config.registry.gate == "bootstrap"
    # Pairs with classes (paraphrase, entailment) train the probe on the pair features.
    classes = PipelineConfig.model_validate({"data": data})
    assert classes.task == "classification"
    assert classes.evaluation.primary_metric == "accuracy"
