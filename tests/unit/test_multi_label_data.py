"""task: multi_label, the data layer: label sets read from delimited strings and lists,
split with every label in proportion, stored as id lists, counted per label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_config, read_goemotions
from transferkit.config import PipelineConfig
from transferkit.data import ingest_data, load_label_map, load_label_sets, load_split
from transferkit.data.readers import read_table
from transferkit.errors import DataError

EMOTIONS = ["joy", "anger", "fear", "surprise", "sadness", "neutral"]


def _sets(rows: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Label sets of 1-5 emotions, 'surprise' and 'sadness' rare (about 5 % of rows), and
    'neutral' alone where no other emotion is (GoEmotions' convention)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        chosen = {e for e in EMOTIONS[:3] if rng.random() < 0.35} | {
            e for e in EMOTIONS[3:5] if rng.random() < 0.05
        }
        out.append(tuple(sorted(chosen or {"neutral"})))
    return out


def _config(tmp_path: Path, uri: Path, **data: object) -> PipelineConfig:
    return make_config(
        tmp_path,
        {"uri": str(uri), "text_column": "text", **data},
        task="multi_label",
    )


def test_delimited_strings_and_lists_read_as_the_same_sets(tmp_path: Path) -> None:
    sets = [("joy",), ("anger", "joy"), (), ("fear",)] * 5
    texts = [f"text {i}" for i in range(len(sets))]
    tsv = tmp_path / "a.tsv"
    # A row with no label is written as an explicit empty list in JSONL; in a text table a
    # set is joined, with stray spaces and a repeated label that reading removes.
    pd.DataFrame({"text": texts[:3], "label": ["joy", " joy ; anger;joy", "fear"]}).to_csv(
        tsv, sep="\t", index=False
    )
    table = read_table(tsv, "a.tsv", "tsv", "text", "label", label_delimiter=";")
    assert table["label"].tolist() == [("joy",), ("anger", "joy"), ("fear",)]
    jsonl = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": t, "label": list(s)}) for t, s in zip(texts, sets, strict=True)]
    jsonl.write_text("".join(line + "\n" for line in lines))
    table = read_table(jsonl, "a.jsonl", "jsonl", "text", "label", label_delimiter=",")
    assert table["label"].tolist() == sets
    parquet = tmp_path / "a.parquet"
    pd.DataFrame({"text": texts, "label": [list(s) for s in sets]}).to_parquet(parquet)
    table = read_table(parquet, "a.parquet", "parquet", "text", "label", label_delimiter=",")
    assert table["label"].tolist() == sets


def test_a_nested_cell_is_refused_with_its_row(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        json.dumps({"text": "a", "label": ["joy"]})
        + "\n"
        + json.dumps({"text": "b", "label": ["joy", {"x": 1}]})
        + "\n"
    )
    with pytest.raises(DataError) as info:
        read_table(jsonl, "a.jsonl", "jsonl", "text", "label", label_delimiter=",")
    message = str(info.value)
    assert message.startswith("a.jsonl line 2: column 'label' holds")
    assert "a multi-label cell is a list of labels" in message


def test_ingest_stores_sets_as_ids_and_keeps_every_label_in_each_split(tmp_path: Path) -> None:
    sets = _sets(2000)
    source = tmp_path / "all.tsv"
    pd.DataFrame(
        {"text": [f"text {i}" for i in range(len(sets))], "label": [",".join(s) for s in sets]}
    ).to_csv(source, sep="\t", index=False)
    result = ingest_data(_config(tmp_path, source), tmp_path / "dataset")
    assert result.task == "multi_label"
    assert result.labels == sorted(EMOTIONS)
    labels = load_label_map(tmp_path / "dataset")
    total = {name: 0 for name in EMOTIONS}
    for split in ("train", "validation", "test"):
        matrix = load_label_sets(tmp_path / "dataset", split)
        texts, _ = load_split(tmp_path / "dataset", split)
        assert matrix.shape == (len(texts), len(EMOTIONS))
        # The stored sets are the sets of those texts in the source.
        for text, row in zip(texts[:50], matrix[:50], strict=True):
            want = set(sets[int(text.split()[1])])
            assert {labels.names[j] for j in np.flatnonzero(row)} == want
        counts = dict(zip(labels.names, matrix.sum(axis=0).tolist(), strict=True))
        assert result.class_balance[split] == counts
        for name in EMOTIONS:
            total[name] += counts[name]
    assert total == {name: sum(name in s for s in sets) for name in EMOTIONS}
    # Stratified on each row's rarest label: the rare 'surprise' keeps its share in the
    # 10 % test split (about 5 % of rows), where a random split may leave it almost out.
    test_share = result.class_balance["test"]["surprise"] / result.rows["test"]
    train_share = result.class_balance["train"]["surprise"] / result.rows["train"]
    assert abs(test_share - train_share) < 0.01


def test_the_real_goemotions_file_ingests_as_28_labels(tmp_path: Path, shared_data: Path) -> None:
    raw = read_goemotions(shared_data, "train.tsv", 6000)
    path = tmp_path / "goemotions.tsv"
    raw.to_csv(path, sep="\t", index=False, quoting=3, escapechar="\\")
    names = (shared_data / "goemotions" / "emotions.txt").read_text().split()
    config = _config(
        tmp_path,
        path,
        label_column="labels",
        label_names={str(i): name for i, name in enumerate(names)},
    )
    result = ingest_data(config, tmp_path / "dataset")
    assert sorted(result.labels) == sorted(names)
    sets = np.concatenate(
        [load_label_sets(tmp_path / "dataset", s) for s in ("train", "validation", "test")]
    )
    assert sets.shape == (6000, 28)
    assert int((sets.sum(axis=1) > 1).sum()) == int(raw["labels"].str.contains(",").sum())


def test_the_real_goemotions_dev_file_reads_as_it_is_with_named_columns(
    tmp_path: Path, shared_data: Path
) -> None:
    """The GoEmotions files have no header row: data.columns names their three columns."""
    dev = shared_data / "goemotions" / "dev.tsv"
    columns = ["text", "labels", "id"]
    config = _config(tmp_path, dev, columns=columns, label_column="labels")
    result = ingest_data(config, tmp_path / "dataset")
    # Every line is a row: the first was not taken for a header (5,426 lines).
    lines = dev.read_text(encoding="utf-8").splitlines()
    assert sum(result.rows.values()) == len(lines) == 5426
    _, sets = load_split(tmp_path / "dataset", "train")
    assert sets.dtype == bool
    assert sets.shape[1] == 28
    wrong = _config(tmp_path, dev, columns=columns, text_column="sentence")
    with pytest.raises(DataError, match=r"dev.tsv: no column 'sentence' \(columns: text, labels"):
        ingest_data(wrong, tmp_path / "x")


def test_task_and_strategy_must_agree(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="strategy 'domain_adaptation' does not train task 'multi_label'"
    ):
        make_config(
            tmp_path,
            {"uri": "a.tsv"},
            task="multi_label",
            strategy={"name": "domain_adaptation", "unlabelled_uri": "u.txt"},
        )
    for name in ("zero_shot", "few_shot"):  # tagging by descriptions; SetFit one-vs-rest
        strategy = make_config(
            tmp_path, {"uri": "a.tsv"}, task="multi_label", strategy={"name": name}
        )
        assert strategy.task == "multi_label"
    with pytest.raises(ValueError, match="strategy 'zero_shot' scores text pairs"):
        make_config(
            tmp_path,
            {"uri": "a.tsv", "text_pair_column": "b"},
            task="multi_label",
            strategy={"name": "zero_shot"},
        )
    with pytest.raises(ValueError, match="accuracy judges one label per row"):
        make_config(
            tmp_path,
            {"uri": "a.tsv"},
            task="multi_label",
            evaluation={"primary_metric": "accuracy"},
        )
    with pytest.raises(ValueError, match=r"training\.class_weights applies to task: class"):
        make_config(
            tmp_path, {"uri": "a.tsv"}, task="multi_label", training={"class_weights": "balanced"}
        )
    with pytest.raises(ValueError, match="micro_f1 judges label sets"):
        make_config(tmp_path, {"uri": "a.tsv"}, evaluation={"primary_metric": "micro_f1"})
    config = make_config(tmp_path, {"uri": "a.tsv"}, task="multi_label")
    assert (config.evaluation.primary_metric, config.registry.gate) == ("macro_f1", "bootstrap")


def test_an_empty_text_cell_is_not_read_as_an_empty_set(tmp_path: Path) -> None:
    """An empty cell may be a missing label: it is refused, and the message says how to
    write a row with no labels."""
    tsv = tmp_path / "a.tsv"
    pd.DataFrame({"text": ["a", "b"], "label": ["joy", ""]}).to_csv(tsv, sep="\t", index=False)
    with pytest.raises(DataError) as info:
        read_table(tsv, "a.tsv", "tsv", "text", "label", label_delimiter=",")
    assert "a.tsv line 3: empty or NaN label in column 'label'" in str(info.value)
    assert "an empty list in JSONL or Parquet" in str(info.value)


def test_an_unlabelled_training_split_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "all.jsonl"
    source.write_text("".join(json.dumps({"text": f"t{i}", "label": []}) + "\n" for i in range(40)))
    with pytest.raises(DataError, match="no training row has a label"):
        ingest_data(_config(tmp_path, source), tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()


def test_id_lists_become_a_boolean_matrix() -> None:
    from transferkit.data.dataset import label_sets

    sets = label_sets([[0, 2], [], np.array([1])], 3)
    assert sets.tolist() == [[True, False, True], [False, False, False], [False, True, False]]
