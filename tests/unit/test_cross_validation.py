"""k-fold cross-validation of a strategy (training.cross_validation_folds): the folds, the
scores, and that the evaluation split never takes part."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import image_config, make_config
from transferkit.data import LabelMap, load_labels
from transferkit.errors import ConfigError, DataError
from transferkit.evaluation import render_report
from transferkit.training import train
from transferkit.training.crossval import assign_folds, check_folds, fold_datasets

FAST = {"epochs": 1, "batch_size": 64, "learning_rate": 1e-3, "precision": "fp32"}


def cross_validate(breast_run: tuple, tmp_path: Path, strategy: dict, dataset: Path | None = None):
    root, data, resnet20 = breast_run
    config = image_config(
        tmp_path,
        data,
        resnet20,
        strategy=strategy,
        training={**FAST, "cross_validation_folds": 5},
    )
    dataset = dataset or root / "dataset"
    return train(config, dataset, root / "backbone", root / "features", tmp_path / "m")


def test_folds_are_stratified_balanced_and_reproducible() -> None:
    labels = np.array([0] * 37 + [1] * 101 + [2] * 9)
    folds = assign_folds(labels, 5, seed=7)
    assert np.array_equal(folds, assign_folds(labels, 5, seed=7))
    assert not np.array_equal(folds, assign_folds(labels, 5, seed=8))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1
    for label in range(3):  # every label spread over the folds as evenly as it can be
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1


def test_a_label_rarer_than_the_folds_is_refused_in_one_line() -> None:
    labels = np.array([0] * 40 + [1] * 3)
    with pytest.raises(DataError) as caught:
        check_folds(labels, LabelMap(values=["0", "1"], names=["benign", "malignant"]), 5)
    message = str(caught.value)
    assert "training.cross_validation_folds" in message
    assert "'malignant' has 3" in message
    assert "\n" not in message


def test_fold_datasets_partition_the_pooled_train_and_validation_rows(
    breast_run: tuple, tmp_path: Path
) -> None:
    root, _, _ = breast_run
    n_train = len(load_labels(root / "dataset", "train"))
    n_val = len(load_labels(root / "dataset", "validation"))
    seen = []
    for fold in fold_datasets(root / "dataset", root / "features", 5, 42, tmp_path):
        parts = (fold.train, fold.stop, fold.held_out)
        assert sum(map(len, parts)) == n_train + n_val
        assert len(np.unique(np.concatenate(parts))) == n_train + n_val  # disjoint
        # The early-stopping share is the validation split's share of the pooled rows.
        assert len(fold.stop) == pytest.approx(
            n_val / (n_train + n_val) * (n_train + n_val - len(fold.held_out)), abs=2
        )
        images = np.load(fold.dataset_dir / "test_images.npy")
        features = np.load(fold.features_dir / "test.npy")
        assert len(images) == len(features) == len(fold.held_out)
        seen.append(fold.held_out)
    held = np.concatenate(seen)
    assert len(held) == len(np.unique(held)) == n_train + n_val  # each row held out once


def test_linear_probe_is_scored_on_every_fold_and_the_evaluation_split_takes_no_part(
    breast_run: tuple, tmp_path: Path
) -> None:
    root, _, _ = breast_run
    result = cross_validate(breast_run, tmp_path / "a", {"name": "linear_probe"})
    folds = result.cross_validation
    assert folds is not None
    assert folds.folds == 5
    assert len(folds.scores) == 5
    assert folds.rows == len(load_labels(root / "dataset", "train")) + len(
        load_labels(root / "dataset", "validation")
    )
    assert folds.mean == pytest.approx(np.mean(folds.scores))
    assert folds.std == pytest.approx(np.std(folds.scores, ddof=1))
    # Frozen CIFAR features rank breast ultrasound above chance on every fold.
    assert min(folds.scores) > 0.6, folds
    assert folds.out_of_fold > 0.7, folds
    # The final model is the ordinary one, trained on the train split.
    assert result.labelled_examples == len(load_labels(root / "dataset", "train"))

    # Scramble the evaluation split: labels reversed, images blacked out. Nothing changes.
    scrambled = tmp_path / "scrambled"
    shutil.copytree(root / "dataset", scrambled)
    images = np.load(scrambled / "test_images.npy")
    np.save(scrambled / "test_images.npy", np.zeros_like(images))
    frame = pd.read_parquet(scrambled / "test.parquet")
    frame["label"] = 1 - frame["label"]
    frame.to_parquet(scrambled / "test.parquet", index=False)
    again = cross_validate(breast_run, tmp_path / "b", {"name": "linear_probe"}, scrambled)
    assert again.cross_validation is not None
    assert again.cross_validation.scores == folds.scores


def test_fine_tuning_and_adabn_cross_validate_through_saved_models(
    breast_run: tuple, tmp_path: Path
) -> None:
    partial = cross_validate(
        breast_run, tmp_path / "partial", {"name": "partial_finetune", "train_top_layers": 3}
    )
    assert partial.cross_validation is not None
    assert len(partial.cross_validation.scores) == 5
    assert partial.cross_validation.out_of_fold > 0.6
    # AdaBN re-extracts features of each fold with the adapted backbone (its own cache key).
    adabn_probe = {"name": "domain_adaptation", "then": {"name": "linear_probe"}}
    adabn = cross_validate(breast_run, tmp_path / "adabn", adabn_probe)
    assert adabn.cross_validation is not None
    assert len(adabn.cross_validation.scores) == 5
    assert adabn.cross_validation.scores != partial.cross_validation.scores
    # The report of the final model says what cross-validation found.
    report = render_report_of(partial)
    assert "Cross-validated roc_auc over 5 folds" in report


def render_report_of(result) -> str:
    from transferkit.evaluation import EvaluationResult
    from transferkit.metrics import score

    scores = score(np.array([0, 1]), np.array([0, 1]), ["malignant", "benign"], np.eye(2))
    evaluation = EvaluationResult(
        primary_metric="roc_auc",
        primary_value=1.0,
        scores=scores,
        strategy=result.strategy,
        seconds=0.0,
        precision="fp32",
    )
    return render_report(evaluation, result.model_dump(), {}, {})


def test_text_probe_cross_validates(probe_run: tuple, tmp_path: Path) -> None:
    config, root, _ = probe_run
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"cross_validation_folds": 3})}
    )
    result = train(config, root / "dataset", root / "backbone", root / "features", tmp_path / "m")
    assert result.cross_validation is not None
    assert len(result.cross_validation.scores) == 3
    # MiniLM features separate SST-2 sentiment well above chance on every fold.
    assert min(result.cross_validation.scores) > 0.7


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"training": {"cross_validation_folds": 2}},
            "training.cross_validation_folds",
        ),
        (
            {
                "training": {"cross_validation_folds": 3, "nodes": 2},
                "strategy": {"name": "full_finetune"},
            },
            "cross-validation trains on one node",
        ),
        (
            {
                "sweep": {
                    "branches": [
                        {"strategy": {"name": "linear_probe"}},
                        {
                            "strategy": {"name": "scratch"},
                            "training": {"cross_validation_folds": 3},
                        },
                    ]
                }
            },
            "set training.cross_validation_folds for the whole sweep",
        ),
    ],
)
def test_bad_cross_validation_settings_are_refused(
    tmp_path: Path, sections: dict, expected: str
) -> None:
    with pytest.raises((ConfigError, ValueError)) as caught:
        make_config(tmp_path, {"train_uri": "t.tsv", "test_uri": "d.tsv"}, **sections)
    assert expected in str(caught.value)
