"""Fine-tuning for every task: the loss and the checkpoint selection of label sets (binary
cross-entropy per label) and scores (MSE on targets scaled to [0, 1], the scale folded back
into the head), and text pairs trained as a cross-encoder (both texts tokenised together) or
a bi-encoder (each text on its own, the head on their pair features). The mechanics on a
linear model and tokenizer calls (default run); learning on real STS Benchmark pairs and
GoEmotions comments with the real MiniLM (``-m tasks``, a few minutes each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tests.conftest import make_config, read_goemotions, stsb_subset
from transferkit.backbones.text import pair_features, run_batched, tokenize
from transferkit.config import FullFinetuneConfig, PipelineConfig
from transferkit.data import TextPairs, ingest_data
from transferkit.data.dataset import load_text_inputs
from transferkit.serving import predictions_frame
from transferkit.training.imbalance import weighted_cross_entropy
from transferkit.training.model import load_classifier, predict_proba
from transferkit.training.objective import Objective


def _steps(config: PipelineConfig, folder: Path, model: str = "model") -> Any:
    """ingest, fetch, extract and train as a run does, into ``folder``; the train result."""
    from transferkit.backbones import fetch_backbone
    from transferkit.features import extract_features
    from transferkit.training import train

    ingest_data(config, folder / "dataset")
    fetch_backbone(config, folder / "backbone")
    extract_features(config, folder / "dataset", folder / "backbone", folder / "features")
    return train(
        config, folder / "dataset", folder / "backbone", folder / "features", folder / model
    )


def _request(folder: Path, rows: int) -> pd.DataFrame:
    """The first test pairs as a served request."""
    test = pd.read_parquet(folder / "dataset" / "test.parquet")[:rows]
    return pd.DataFrame({"text": test["text"], "text_pair": test["text_pair"]})


def _objective(task: str, labels: np.ndarray, metric: str, **training: Any) -> Objective:
    config = PipelineConfig.model_validate(
        {
            "task": task,
            "data": {"train_uri": "a.tsv", "test_uri": "b.tsv"},
            "evaluation": {"primary_metric": metric},
            "training": training,
        }
    )
    names = ["score"] if task == "regression" else [f"l{i}" for i in range(3)]
    return Objective(config, labels, names)


def embed_texts(model: nn.Module, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """A classifier's encoder outputs of single texts."""
    return run_batched(model.encoder, tokenizer, texts, 128)


# --- the objective of each task ---------------------------------------------------------


def test_a_regression_head_trains_on_scaled_targets_and_returns_to_scores() -> None:
    targets = np.array([1.0, 3.0, 5.0, 2.0])
    objective = _objective("regression", targets, "rmse")
    head = nn.Linear(4, 1)
    original = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.randn(4, 4)
    scores = head(x).detach()
    objective.start(head)
    scaled = head(x).detach()
    # In training the head predicts (score - low) / span, the targets' scale...
    torch.testing.assert_close(scaled, (scores - 1.0) / 4.0)
    loss = objective.loss(scaled, np.arange(4), "mean")
    expected = ((scaled[:, 0] - torch.tensor([0.0, 0.5, 1.0, 0.25])) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert objective.loss(scaled, np.arange(4), "sum") == pytest.approx(4 * float(expected))
    # ...validation measures it in the targets' unit...
    truth = np.array([1.5, 2.5, 4.0, 3.0])
    measured = objective.measure(truth, scaled.numpy())
    assert measured == pytest.approx(float(np.sqrt(((scores[:, 0].numpy() - truth) ** 2).mean())))
    # ...and the saved head outputs scores again.
    objective.finish(head)
    for key, value in original.items():
        torch.testing.assert_close(head.state_dict()[key], value)


def test_checkpoints_are_compared_in_the_metric_s_direction() -> None:
    targets = np.array([0.0, 1.0, 2.0])
    assert _objective("regression", targets, "rmse").better(0.5, 0.7)
    assert not _objective("regression", targets, "mae").better(0.7, 0.5)
    assert _objective("regression", targets, "spearman").better(0.7, 0.5)
    assert not _objective("regression", targets, "spearman").better(0.5, 0.7)
    assert _objective("classification", np.array([0, 1, 2]), "accuracy").better(0.9, 0.8)


def test_label_sets_train_with_binary_cross_entropy_per_label() -> None:
    sets = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=bool)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, -3.0, 1.0], [-2.0, 4.0, 0.0]])
    objective = _objective("multi_label", sets, "macro_f1")
    expected = nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(sets).float())
    torch.testing.assert_close(objective.loss(logits, np.arange(3), "mean"), expected)
    # The sum over a batch's shards is the mean times the rows (data-parallel training).
    shards = [objective.loss(logits[s], np.arange(3)[s], "sum") for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(sum(shards) / 3, expected)
    smoothed = _objective("multi_label", sets, "macro_f1", label_smoothing=0.2)
    soft = torch.tensor(sets).float() * 0.8 + 0.1
    torch.testing.assert_close(
        smoothed.loss(logits, np.arange(3), "mean"),
        nn.functional.binary_cross_entropy_with_logits(logits, soft),
    )
    # Selection tunes each label's threshold on the rows it measures: a perfect ranking
    # scores 1 whatever its scale.
    assert objective.measure(sets, logits.numpy() * 0 + sets * 0.1) == 1.0


def test_single_labels_keep_their_weighted_cross_entropy() -> None:
    labels = np.array([0, 2, 1, 2])
    weights = np.array([1.0, 2.0, 0.5])
    config = PipelineConfig.model_validate(
        {"data": {"train_uri": "a.tsv", "test_uri": "b.tsv"}, "training": {"label_smoothing": 0.1}}
    )
    objective = Objective(config, labels, ["a", "b", "c"], weights)
    logits = torch.randn(4, 3)
    rows = np.array([3, 0, 1])
    torch.testing.assert_close(
        objective.loss(logits[rows], rows, "mean"),
        weighted_cross_entropy(
            logits[rows],
            torch.tensor(labels[rows]),
            torch.tensor(weights[labels[rows]]),
            0.1,
            "mean",
        ),
    )


# --- cross-encoder inputs -----------------------------------------------------------------


def test_a_pair_is_tokenised_as_one_sequence_as_transformers_does(minilm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    pairs = [
        ("A man is playing a flute.", "A man is playing a bamboo flute."),
        ("short", "a much longer second sentence that will be cut when the limit is low"),
        ("", "only the second text"),
    ]
    for max_length in (8, 16, 128):
        expected = tokenizer(
            [a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=max_length
        )["input_ids"]
        assert tokenize(tokenizer, pairs, max_length) == expected
    ids = tokenize(tokenizer, pairs[:1], 128)[0]
    assert ids.count(tokenizer.sep_token_id) == 2  # [CLS] first [SEP] second [SEP]


# --- the whole path on real data ----------------------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    """MiniLM fine-tuned as a cross-encoder on 800 STS-B training pairs, evaluated on 300
    test pairs."""
    from transferkit.evaluation import evaluate

    tmp = tmp_path_factory.mktemp("cross-encoder")
    data = stsb_subset(tmp, shared_data, {"train": 800, "validation": 200, "test": 300})
    config = make_config(
        tmp,
        data,
        task="regression",
        strategy={"name": "full_finetune"},
        training={"epochs": 2, "batch_size": 16, "learning_rate": 5e-5},
        registry={"model_name": "stsb-cross"},
    )
    result = _steps(config, tmp)
    scored = evaluate(config, tmp / "dataset", tmp / "model", tmp / "evaluation")
    return {"folder": tmp, "config": config, "train": result, "evaluation": scored}


@pytest.mark.slow
@pytest.mark.tasks
def test_a_fine_tuned_pair_model_is_a_cross_encoder_that_learns_the_scores(
    cross_encoder: dict[str, Any],
) -> None:
    config = cross_encoder["config"]
    assert config.strategy.head_init == "random"  # unset: a cross-encoder has no probe
    history = cross_encoder["train"].details
    values = [v["spearman"] for v in history["validations"]]
    assert history["best_validation_metric"] == max(values)
    assert values[0] < 0.3 < max(values)  # from a random head to ranking the pairs
    scores = cross_encoder["evaluation"].scores
    truth = load_text_inputs(cross_encoder["folder"] / "dataset", "test")[1]
    assert scores.spearman > 0.6
    # The head outputs scores in the targets' unit (the [0, 1] scale folded back).
    assert scores.rmse < truth.std()
    predicted = pd.read_parquet(cross_encoder["folder"] / "evaluation" / "predictions.parquet")
    assert abs(predicted["predicted"].mean() - truth.mean()) < 0.5


@pytest.mark.slow
@pytest.mark.tasks
def test_the_cross_encoder_serves_pairs_read_together(cross_encoder: dict[str, Any]) -> None:
    folder = cross_encoder["folder"]
    tokenizer, model, card = load_classifier(folder / "model")
    assert (card.pair, card.cross_encoder, card.regression) == (True, True, True)
    assert model.head.in_features == 384  # the encoder's output of both texts, not 4 × 384
    request = _request(folder, 24)
    served = predictions_frame(
        predict_proba(model, tokenizer, card, request), card.labels, None, True
    )
    evaluated = pd.read_parquet(folder / "evaluation" / "predictions.parquet")
    np.testing.assert_allclose(served["score"], evaluated["predicted"][:24], atol=1e-4)
    # Order matters to a cross-encoder, and it reads each pair as one sequence: its output
    # is the model on "[CLS] first [SEP] second [SEP]".
    input_ids, mask = (
        torch.tensor(x)
        for x in (
            tokenizer(request["text"][0], request["text_pair"][0])["input_ids"],
            tokenizer(request["text"][0], request["text_pair"][0])["attention_mask"],
        )
    )
    with torch.no_grad():
        direct = model(input_ids[None], mask[None])[0, 0].item()
    assert served["score"][0] == pytest.approx(direct, abs=1e-4)
    with pytest.raises(ValueError, match="text_pair"):
        predict_proba(model, tokenizer, card, pd.DataFrame({"text": ["one text"]}))


@pytest.fixture(scope="module")
def bi_encoder(cross_encoder: dict[str, Any]) -> dict[str, Any]:
    """The same pairs fine-tuned as a bi-encoder, its head started from the ridge probe."""
    from transferkit.evaluation import evaluate
    from transferkit.training import train

    tmp = cross_encoder["folder"]
    config = cross_encoder["config"].model_copy(deep=True)
    config.strategy = FullFinetuneConfig(pair_encoder="bi")
    config = PipelineConfig.model_validate(config.model_dump())
    result = train(config, tmp / "dataset", tmp / "backbone", tmp / "features", tmp / "bi-model")
    scored = evaluate(config, tmp / "dataset", tmp / "bi-model", tmp / "bi-evaluation")
    return {"folder": tmp, "config": config, "train": result, "evaluation": scored}


@pytest.mark.slow
@pytest.mark.tasks
def test_a_bi_encoder_trains_the_encoder_through_the_pair_features(
    bi_encoder: dict[str, Any], minilm_dir: Path
) -> None:
    from transformers import AutoModel

    folder = bi_encoder["folder"]
    assert bi_encoder["config"].strategy.head_init == "probe"  # the ridge, as LP-FT
    history = bi_encoder["train"].details
    values = [v["spearman"] for v in history["validations"]]
    assert values[0] > 0.7  # the ridge head on the frozen encoder already ranks the pairs
    assert max(values) > values[0]  # and training the encoder improves on it
    assert bi_encoder["evaluation"].scores.spearman > 0.75
    tokenizer, model, card = load_classifier(folder / "bi-model")
    assert (card.pair, card.cross_encoder) == (True, False)
    assert model.head.in_features == 4 * 384
    original = AutoModel.from_pretrained(minilm_dir).embeddings.word_embeddings.weight
    trained = model.encoder.body.embeddings.word_embeddings.weight
    assert not torch.equal(original, trained)
    request = _request(folder, 24)
    served = predict_proba(model, tokenizer, card, request)[:, 0]
    evaluated = pd.read_parquet(folder / "bi-evaluation" / "predictions.parquet")
    np.testing.assert_allclose(served, evaluated["predicted"][:24], atol=1e-4)
    # Each text is embedded alone: the pair's score is the head on its two embeddings.
    u, v = (embed_texts(model, tokenizer, list(request[c])) for c in ("text", "text_pair"))
    with torch.no_grad():
        direct = model.head(torch.from_numpy(pair_features(u, v)))[:, 0].numpy()
    np.testing.assert_allclose(served, direct, atol=1e-4)


class _Rows:
    """Feature rows as training inputs (the ``Inputs`` protocol) for a linear model."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = torch.from_numpy(x).float()

    def __len__(self) -> int:
        return len(self.x)

    def epoch(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(len(self.x))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def tensors(self, index: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        return (self.x[index],)

    def logits(self, model: nn.Module, batch_size: int, precision: str) -> np.ndarray:
        with torch.no_grad():
            return model(self.x).numpy()


class _Linear(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@pytest.mark.parametrize("metric", ["rmse", "spearman"])
def test_scores_fine_tune_to_the_best_checkpoint_in_the_metric_s_direction(metric: str) -> None:
    from transferkit.training.finetune import finetune

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8))
    y = 10 + 40 * (x @ rng.normal(size=8)) / 8 + rng.normal(0, 0.5, 600)  # far from [0, 1]
    config = PipelineConfig.model_validate(
        {
            "task": "regression",
            "data": {"train_uri": "a.tsv", "test_uri": "b.tsv"},
            "evaluation": {"primary_metric": metric},
            "training": {
                "epochs": 6,
                "batch_size": 50,
                "learning_rate": 0.05,
                "eval_every_steps": 4,
                "early_stopping_patience": 0,
                "warmup_ratio": 0.0,
            },
        }
    )
    torch.manual_seed(0)
    model = _Linear(8)
    with torch.no_grad():  # a head outputs scores: it starts at the mean score
        model.head.bias.fill_(float(y[:400].mean()))
    groups = [{"params": list(model.parameters()), "lr": 0.05, "weight_decay": 0.0}]
    history = finetune(
        model, config, _Rows(x[:400]), y[:400], _Rows(x[400:]), y[400:], ["score"], groups, "fp32"
    )
    values = [v[metric] for v in history.validations]
    best = min(values) if metric == "rmse" else max(values)
    assert history.best_validation_metric == best
    assert history.best_step == history.validations[values.index(best)]["step"] > 0
    # The kept head outputs scores in the targets' unit: its error is the selected one.
    predicted = model(torch.from_numpy(x[400:]).float()).detach().numpy()[:, 0]
    rmse = float(np.sqrt(((predicted - y[400:]) ** 2).mean()))
    if metric == "rmse":
        assert rmse == pytest.approx(best, rel=1e-4)
    assert rmse < 0.2 * y[400:].std()


@pytest.mark.slow
@pytest.mark.tasks
def test_label_sets_fine_tune_with_thresholds_chosen_on_validation(
    tmp_path: Path, shared_data: Path
) -> None:
    from transferkit.evaluation import evaluate

    uris = {}
    for split, name, rows in (
        ("train", "train", 3000),
        ("validation", "dev", 600),
        ("test", "test", 600),
    ):
        frame = read_goemotions(shared_data, f"{name}.tsv", rows)
        path = tmp_path / f"{name}.tsv"
        frame.to_csv(path, sep="\t", header=False, index=False)
        uris[f"{split}_uri"] = str(path)
    config = make_config(
        tmp_path,
        {
            **uris,
            "format": "tsv",
            "columns": ["text", "labels", "id"],
            "text_column": "text",
            "label_column": "labels",
            "label_delimiter": ",",
        },
        task="multi_label",
        strategy={"name": "full_finetune"},  # from the probe's head (LP-FT)
        training={"epochs": 2, "learning_rate": 1e-4, "batch_size": 32},
    )
    result = _steps(config, tmp_path)
    values = [v["macro_f1"] for v in result.details["validations"]]
    assert max(values) > values[0] + 0.01  # training the encoder improves on the probe
    _, model, card = load_classifier(tmp_path / "model")
    assert card.multi_label
    assert not card.pair
    assert card.decision is not None
    assert card.decision.thresholds is not None
    assert len(card.decision.thresholds) == model.head.out_features
    scored = evaluate(config, tmp_path / "dataset", tmp_path / "model", tmp_path / "evaluation")
    assert scored.primary_value > 0.1


# --- what validate says -------------------------------------------------------------------


def test_fine_tuning_takes_every_task_and_pairs() -> None:
    data = {"train_uri": "a.tsv", "test_uri": "b.tsv", "text_pair_column": "s2"}
    for name in ("full_finetune", "partial_finetune", "lora", "scratch"):
        config = PipelineConfig.model_validate(
            {"task": "regression", "data": data, "strategy": {"name": name}}
        )
        assert getattr(config.strategy, "head_init", "random") == "random"
    single = {"train_uri": "a.tsv", "test_uri": "b.tsv"}
    config = PipelineConfig.model_validate(
        {"task": "regression", "data": single, "strategy": {"name": "full_finetune"}}
    )
    assert config.strategy.head_init == "probe"  # LP-FT from the ridge on single texts
    with pytest.raises(ValueError, match="head_init: probe fits the head on frozen pair"):
        PipelineConfig.model_validate(
            {
                "task": "regression",
                "data": data,
                "strategy": {"name": "lora", "head_init": "probe"},
            }
        )
    with pytest.raises(ValueError, match="strategy 'few_shot' does not train task 'regression'"):
        PipelineConfig.model_validate(
            {"task": "regression", "data": single, "strategy": {"name": "few_shot"}}
        )


def test_pairs_of_the_served_frame_reach_the_cross_encoder_as_pairs() -> None:
    pairs = TextPairs(["a", "b"], ["c", "d"])
    assert pairs.joined() == [("a", "c"), ("b", "d")]
    assert pairs.take([1]).joined() == [("b", "d")]
