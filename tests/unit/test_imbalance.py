"""Class imbalance: label weights in the loss (``training.class_weights``), a binary model's
decision threshold (``training.decision_threshold``) recorded with it and used wherever it
decides, label prevalence in the report, and label columns that are not one class per row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.class_weight import compute_class_weight

from tests.conftest import image_config, read_goemotions
from transferkit.config import PipelineConfig
from transferkit.data import LabelMap
from transferkit.data.readers import read_table
from transferkit.errors import ConfigError, DataError
from transferkit.metrics import Decision, paired_comparison, score, tune_threshold
from transferkit.training.imbalance import class_weights, decision
from transferkit.training.probe import fit_probe

LABELS = LabelMap(values=["0", "1", "2"], names=["low", "mid", "high"])


# --- the threshold ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "balanced_accuracy"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_tuned_threshold_is_the_best_of_every_cut(metric: str, seed: int) -> None:
    """Against brute force: every threshold between observed probabilities, scored by the
    same metric code evaluate uses; ties in the probabilities included."""
    rng = np.random.default_rng(seed)
    rows = 300
    truth = (rng.random(rows) < 0.2).astype(int)  # 20 % positive
    p = np.clip(0.25 * truth + rng.normal(0.35, 0.2, rows), 0, 1).round(2)  # ties
    proba = np.stack([1 - p, p], axis=1)
    threshold, value = tune_threshold(truth, proba, 1, metric)
    names = ["neg", "pos"]
    candidates = np.r_[np.unique(p), 1.01]
    brute = max(score(truth, (p >= t).astype(int), names, proba).metric(metric) for t in candidates)
    assert value == pytest.approx(brute)
    decided = Decision(positive=1, threshold=threshold).apply(proba)
    assert score(truth, decided, names, proba).metric(metric) == pytest.approx(value)
    # With 20 % positives, argmax is not the best rule for the balanced metrics.
    if metric != "accuracy":
        argmax = score(truth, proba.argmax(axis=1), names, proba).metric(metric)
        assert value > argmax


def test_a_threshold_for_the_first_label_decides_for_it() -> None:
    proba = np.array([[0.30, 0.70], [0.45, 0.55], [0.80, 0.20]])
    assert Decision(positive=0, threshold=0.4).apply(proba).tolist() == [1, 0, 0]
    assert Decision(positive=1, threshold=0.6).apply(proba).tolist() == [1, 0, 0]
    assert Decision().apply(proba).tolist() == [1, 1, 0]


def test_a_threshold_needs_two_labels_and_a_metric_of_decisions() -> None:
    with pytest.raises(DataError, match="decides between two labels") as caught:
        decision(0.3, LABELS, None, "accuracy", None)
    assert "\n" not in str(caught.value)
    binary = LabelMap(values=["0", "1"], names=["benign", "malignant"])
    rule, record = decision(0.3, binary, "benign", "accuracy", None)
    assert (rule.positive, rule.threshold, record) == (0, 0.3, {})
    assert decision("argmax", binary, None, "accuracy", None)[0] is None
    with pytest.raises(ValueError, match="roc_auc"):
        tune_threshold(np.array([0, 1]), np.array([[0.6, 0.4], [0.3, 0.7]]), 1, "roc_auc")


def test_the_paired_test_compares_what_each_model_decides() -> None:
    """A champion deciding by a threshold is scored on its decisions, not on argmax."""
    truth = np.array([1, 1, 1, 0, 0, 0] * 20)
    proba = np.tile(
        np.array([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.9, 0.1]] + [[0.9, 0.1]] * 2), (20, 1)
    )
    by_threshold = Decision(positive=1, threshold=0.3).apply(proba)  # all right
    argmax = proba.argmax(axis=1)  # half right
    plain = paired_comparison(truth, proba, proba, ["neg", "pos"], "accuracy", "mcnemar", 0.05)
    assert plain.champion == pytest.approx(0.5)
    decided = paired_comparison(
        truth,
        proba,
        proba,
        ["neg", "pos"],
        "accuracy",
        "mcnemar",
        0.05,
        champion_predicted=by_threshold,
    )
    assert decided.champion == pytest.approx(1.0)
    assert decided.challenger == pytest.approx(float(np.mean(argmax == truth)))
    assert decided.champion_only_right == 60
    assert decided.challenger_only_right == 0


# --- class weights ---------------------------------------------------------------------------


def test_balanced_weights_are_scikit_learns() -> None:
    truth = np.array([0] * 70 + [1] * 25 + [2] * 5)
    ours = class_weights("balanced", truth, LABELS)
    theirs = compute_class_weight("balanced", classes=np.arange(3), y=truth)
    assert ours is not None
    np.testing.assert_allclose(ours, theirs)
    assert class_weights("none", truth, LABELS) is None


def test_weights_by_name_or_raw_value_and_bad_keys_in_one_line() -> None:
    truth = np.array([0, 1, 2])
    weights = class_weights({"high": 4.0, "1": 2.0}, truth, LABELS)
    assert weights is not None
    assert weights.tolist() == [1.0, 2.0, 4.0]
    with pytest.raises(DataError, match="names 'hgih', not a label") as caught:
        class_weights({"hgih": 4.0}, truth, LABELS)
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match="high has none"):
        class_weights("balanced", np.array([0, 1, 1]), LABELS)


def test_balanced_weights_raise_the_minority_recall_of_the_probe() -> None:
    """Two overlapping Gaussians, 5 % minority: the unweighted probe mostly ignores it."""
    rng = np.random.default_rng(0)

    def draw(rows: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(rows) < 0.05).astype(int)
        x = rng.normal(0, 1, (rows, 8))
        x[:, 0] += 1.5 * y  # one informative direction, heavily overlapping
        return x, y

    (x, y), (xv, yv), (xt, yt) = draw(2000), draw(500), draw(2000)
    names = ["common", "rare"]
    fits = {}
    for setting in ("none", "balanced"):
        weights = class_weights(setting, y, LabelMap(values=["0", "1"], names=names))
        head, _ = fit_probe(x, y, xv, yv, names, [1e-3], 200, "accuracy", class_weights=weights)
        predicted = (xt @ head.weight.detach().numpy().T + head.bias.detach().numpy()).argmax(1)
        fits[setting] = score(yt, predicted, names)
    rare = {k: s.per_class["rare"].recall for k, s in fits.items()}
    assert rare["none"] < 0.5 < rare["balanced"]
    assert fits["balanced"].balanced_accuracy > fits["none"].balanced_accuracy + 0.1


def test_unit_weights_fit_the_same_probe_as_none() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 6)), rng.integers(0, 3, 200)
    names = LABELS.names
    plain, _ = fit_probe(x, y, x, y, names, [1e-2], 100, "accuracy")
    ones, _ = fit_probe(x, y, x, y, names, [1e-2], 100, "accuracy", class_weights=np.ones(3))
    torch_close = np.allclose(
        plain.weight.detach().numpy(), ones.weight.detach().numpy(), atol=1e-6
    )
    assert torch_close


# --- the config ------------------------------------------------------------------------------


def _config(**training: object) -> dict:
    return {"data": {"train_uri": "train.tsv"}, "training": training}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {**_config(class_weights="balanced"), "strategy": {"name": "zero_shot"}},
            "training.class_weights: 'zero_shot' learns from no labels",
        ),
        (
            {**_config(decision_threshold="tuned"), "evaluation": {"primary_metric": "roc_auc"}},
            "roc_auc does not depend on the threshold",
        ),
        (
            {
                **_config(decision_threshold=0.3),
                "data": {"train_uri": "t.tsv", "label_names": {"0": "a", "1": "b", "2": "c"}},
            },
            "a threshold decides between two labels, and data.label_names names 3",
        ),
    ],
)
def test_imbalance_settings_that_cannot_apply_are_refused_in_one_line(
    raw: dict, expected: str, tmp_path: Path
) -> None:
    from transferkit.config import load_config

    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_thresholds_outside_zero_and_one_are_refused() -> None:
    for bad in (0.0, 1.0, 1.5, "median"):
        with pytest.raises(ValueError, match="decision_threshold"):
            PipelineConfig.model_validate(_config(decision_threshold=bad))
    assert (
        PipelineConfig.model_validate(_config(decision_threshold=0.25)).training.decision_threshold
        == 0.25
    )
    with pytest.raises(ValueError, match="class_weights"):
        PipelineConfig.model_validate(_config(class_weights={"a": 0}))


# --- end to end on real data: BreastMNIST (27 % malignant) -----------------------------------


def test_breastmnist_balanced_weights_and_a_tuned_threshold_through_train_evaluate_serve(
    breast_run: tuple, tmp_path: Path
) -> None:
    """The probe on frozen ResNet-20 features: balanced weights raise the recall of the
    minority (malignant); a threshold tuned on validation is recorded with the model, and
    evaluation, the report and the served model all decide by it."""
    from transferkit.evaluation import evaluate
    from transferkit.serving import predictions_frame
    from transferkit.training import train
    from transferkit.training.model import load_classifier, predict_proba

    root, data, resnet20 = breast_run
    results = {}
    for name, training in (
        ("plain", {}),
        ("balanced", {"class_weights": "balanced"}),
        ("tuned", {"class_weights": "balanced", "decision_threshold": "tuned"}),
    ):
        config = image_config(
            tmp_path / name,
            data,
            resnet20,
            training={"precision": "fp32", **training},
            evaluation={"primary_metric": "balanced_accuracy"},
        )
        model_dir = tmp_path / name / "model"
        trained = train(config, root / "dataset", root / "backbone", root / "features", model_dir)
        evaluated = evaluate(config, root / "dataset", model_dir, tmp_path / name / "evaluation")
        results[name] = (trained, evaluated, model_dir)

    recall = {k: v[1].scores.per_class["0"].recall for k, v in results.items()}
    assert recall["balanced"] > recall["plain"]

    trained, evaluated, model_dir = results["tuned"]
    record = trained.details["decision"]
    assert 0 < record["threshold"] < 1
    assert record["positive"] == 1
    assert record["validation_balanced_accuracy"] >= record["validation_balanced_accuracy_argmax"]
    tokenizer, model, card = load_classifier(model_dir)
    assert card.decision.threshold == pytest.approx(record["threshold"])
    predictions = pd.read_parquet(tmp_path / "tuned" / "evaluation" / "predictions.parquet")
    by_threshold = (predictions["p_1"] >= record["threshold"]).astype(int)
    assert (predictions["predicted"] == by_threshold).all()
    report = (tmp_path / "tuned" / "evaluation" / "report.md").read_text()
    assert "Decision: 1 when its probability reaches" in report
    assert "Label prevalence" in report
    assert "| train | validation | test |" in report
    # The served frame decides as evaluation did, row for row.
    images = np.load(str(data["uri"]))["test_images"]
    served = predictions_frame(
        predict_proba(model, tokenizer, card, images), card.labels, card.decision
    )
    assert (served["label"].to_numpy() == np.array(card.labels)[predictions["predicted"]]).all()
    assert evaluated.scores.rows == len(served)


# --- label columns that are not one class per row --------------------------------------------


def _table(tmp_path: Path, labels: list[str]) -> Path:
    path = tmp_path / "train.tsv"
    pd.DataFrame({"text": [f"row {i}" for i in range(len(labels))], "label": labels}).to_csv(
        path, sep="\t", index=False
    )
    return path


def test_goemotions_is_refused_as_multi_label_not_trained_as_one_class_per_set(
    shared_data: Path, tmp_path: Path
) -> None:
    """The real GoEmotions training file (no header: text, label ids, comment id)."""
    raw = read_goemotions(shared_data, "train.tsv")
    path = tmp_path / "goemotions.tsv"
    raw.to_csv(path, sep="\t", index=False, quoting=3, escapechar="\\")
    with pytest.raises(DataError) as caught:
        read_table(path, "goemotions.tsv", "tsv", "text", "labels")
    message = str(caught.value)
    assert "of 43,410 labels in column 'labels' join several labels with ','" in message
    assert "multi-label" in message
    assert "\n" not in message


def test_labels_with_a_separator_that_are_not_composites_are_kept(tmp_path: Path) -> None:
    labels = ["sci|tech", "arts|culture"] * 30
    table = read_table(_table(tmp_path, labels), "t.tsv", "tsv", "text", "label")
    assert sorted(table["label"].unique()) == ["arts|culture", "sci|tech"]


def test_scores_are_refused_as_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = [f"{v:.2f}" for v in rng.uniform(0, 5, 200)]
    with pytest.raises(DataError, match="regression") as caught:
        read_table(_table(tmp_path, scores), "sts.tsv", "tsv", "text", "label")
    assert "\n" not in str(caught.value)
    ids = [f"id-{i}" for i in range(100)]  # read as they are: ingest tells them apart
    assert (
        read_table(_table(tmp_path, ids), "t.tsv", "tsv", "text", "label")["label"].nunique() == 100
    )
    # A few half-step classes (ratings 1.0 … 5.0) stay classes.
    ratings = [f"{1 + (i % 9) / 2:.1f}" for i in range(90)]
    assert (
        read_table(_table(tmp_path, ratings), "t.tsv", "tsv", "text", "label")["label"].nunique()
        == 9
    )


def test_an_id_column_as_label_is_named_when_the_split_cannot_hold_every_label(
    tmp_path: Path,
) -> None:
    from tests.conftest import make_config
    from transferkit.data import ingest_data

    path = _table(tmp_path, [f"id-{i}" for i in range(120)])
    config = make_config(tmp_path, {"train_uri": str(path), "text_column": "text"})
    with pytest.raises(DataError) as caught:
        ingest_data(config, tmp_path / "dataset")
    message = str(caught.value)
    assert "holds 120 distinct values in 120 training rows" in message
    assert "an id or a text, not a class label" in message
    assert not (tmp_path / "dataset").exists()


def test_the_fine_tuning_loss_weighs_rows_and_shards_add_up_to_the_global_mean() -> None:
    """What fine-tuning minimises: unweighted, exactly torch's cross-entropy; weighted, each
    row's loss × its label's weight, averaged over rows; and two processes' shard sums
    divided by the batch size (finetune's data-parallel scaling) give the same loss."""
    import torch

    from transferkit.training.imbalance import weighted_cross_entropy

    torch.manual_seed(0)
    logits, targets = torch.randn(8, 3), torch.tensor([0, 1, 2, 2, 1, 0, 2, 2])
    plain = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    assert torch.equal(weighted_cross_entropy(logits, targets, None, 0.1, "mean"), plain)
    weights = torch.tensor([1.0, 2.0, 0.5])[targets]
    per_row = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    weighted = weighted_cross_entropy(logits, targets, weights, 0.0, "mean")
    assert weighted.item() == pytest.approx((per_row * weights).mean().item())
    assert weighted.item() != pytest.approx(per_row.mean().item())
    shards = [slice(0, None, 2), slice(1, None, 2)]
    summed = sum(
        weighted_cross_entropy(logits[s], targets[s], weights[s], 0.0, "sum") for s in shards
    )
    assert (summed / len(targets)).item() == pytest.approx(weighted.item())


def test_a_sweeps_zero_shot_branch_trains_without_weights_or_threshold() -> None:
    """The sweep keeps them for the branches that learn from labels and drops them for the
    one that learns from none, rather than refusing the whole sweep."""
    config = PipelineConfig.model_validate(
        {
            **_config(class_weights="balanced", decision_threshold="tuned"),
            "sweep": {
                "branches": [
                    {"strategy": {"name": "linear_probe"}},
                    {"strategy": {"name": "zero_shot"}},
                ]
            },
        }
    )
    assert config.sweep is not None
    probe, zero = (config.branch(b, None) for b in config.sweep.branches)
    assert (probe.training.class_weights, probe.training.decision_threshold) == (
        "balanced",
        "tuned",
    )
    assert (zero.training.class_weights, zero.training.decision_threshold) == ("none", "argmax")
