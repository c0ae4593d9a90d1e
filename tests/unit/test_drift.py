"""The drift statistic: MMD² near zero for one distribution, large for a shifted one, with a
permutation p-value that tells them apart; recent text pairs read from a table and embedded
as a pair model's features, as `transferkit trigger` does, on real STS-B pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_config, read_goemotions, stsb_subset
from transferkit.backbones.modality import modality_of
from transferkit.data import TextPairs
from transferkit.data.dataset import load_text_inputs
from transferkit.drift import mmd_test, read_recent, sample_rows
from transferkit.errors import DataError


def test_one_distribution_gives_near_zero_and_a_large_p_value() -> None:
    rng = np.random.default_rng(0)
    result = mmd_test(rng.normal(size=(300, 8)), rng.normal(size=(200, 8)))
    assert abs(result.mmd2) < 0.01
    assert result.p_value > 0.05
    assert (result.reference_rows, result.recent_rows) == (300, 200)


def test_a_shift_gives_a_large_statistic_and_a_small_p_value() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 8))
    small = mmd_test(reference, rng.normal(loc=0.3, size=(200, 8)))
    large = mmd_test(reference, rng.normal(loc=1.0, size=(200, 8)))
    assert large.mmd2 > small.mmd2 > 0.01
    assert large.p_value == pytest.approx(1 / 201)  # no permutation reaches it
    assert small.p_value < 0.05


def test_the_statistic_is_symmetric_and_seeded() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 4)), rng.normal(loc=0.5, size=(60, 4))
    assert mmd_test(x, y).mmd2 == pytest.approx(mmd_test(y, x).mmd2)
    assert mmd_test(x, y) == mmd_test(x, y)


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="widths differ: 4 vs 3"):
        mmd_test(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least two rows"):
        mmd_test(np.zeros((1, 4)), np.zeros((5, 4)))


def test_sample_rows_is_a_seeded_sorted_subset() -> None:
    rows = sample_rows(10_000, 1000)
    assert len(rows) == 1000
    assert np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, sample_rows(10_000, 1000))
    assert np.array_equal(sample_rows(30, 1000), np.arange(30))


@pytest.mark.slow
def test_a_pair_model_s_drift_reads_recent_pairs_and_tells_a_new_domain(
    tmp_path: Path, shared_data: Path
) -> None:
    from tests.unit.test_finetune_tasks import _steps
    from transferkit.training.model import embed, load_classifier

    data = stsb_subset(tmp_path, shared_data, {"train": 300, "validation": 60, "test": 20})
    config = make_config(
        tmp_path,
        data,
        task="regression",
        trigger={"drift": {"uri": str(tmp_path / "r.csv"), "text_column": "sentence1"}},
    )
    drift = config.trigger.drift
    assert drift is not None
    assert drift.text_pair_column == "sentence2"  # the data's name for the second text
    _steps(config, tmp_path)
    tokenizer, model, card = load_classifier(tmp_path / "model")
    assert card.pair
    training, _ = load_text_inputs(tmp_path / "dataset", "train")
    reference = embed(model, tokenizer, card, training)  # what registration logs
    # Recent pairs of the same kind (sts-dev's first rows: captions of the same videos) and
    # of another (Reddit comments paired in turn).
    dev = (shared_data / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:120]
    same = pd.DataFrame([line.split("\t")[5:7] for line in dev], columns=["sentence1", "sentence2"])
    comments = read_goemotions(shared_data, "dev.tsv", 240)["text"].tolist()
    other = pd.DataFrame({"sentence1": comments[::2], "sentence2": comments[1::2]})
    modality = modality_of("text")
    measured = {}
    for name, frame in (("same", same), ("other", other)):
        frame.to_csv(tmp_path / "r.csv", index=False)
        recent = read_recent(drift, modality, config.storage, pairs=True)
        assert isinstance(recent, TextPairs)
        assert len(recent) == 120
        assert recent.first[0] == frame["sentence1"][0]
        measured[name] = mmd_test(reference, embed(model, tokenizer, card, recent)).mmd2
    # Measured MMD² 0.0005 for the captions and 0.097 for the comments (threshold 0.05).
    assert measured["other"] > 3 * max(measured["same"], 0.01), measured
    assert measured["other"] > drift.threshold > measured["same"], measured
    # A text file holds no pairs; a missing column names both settings.
    (tmp_path / "r.txt").write_text("one\ntwo\n")
    with pytest.raises(DataError, match=r"a \.txt file cannot hold; give a csv"):
        read_recent(
            drift.model_copy(update={"uri": str(tmp_path / "r.txt")}),
            modality,
            config.storage,
            pairs=True,
        )
    other.rename(columns={"sentence2": "reply"}).to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(DataError, match=r"no column 'sentence2' .* set trigger.drift.text_column"):
        read_recent(drift, modality, config.storage, pairs=True)
