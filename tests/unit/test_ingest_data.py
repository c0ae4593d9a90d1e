"""ingest_data: formats, splits, label maps, validation errors, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_config
from transferkit import storage
from transferkit.data import ingest_data, load_label_map, load_split
from transferkit.errors import DataError

ROWS = [
    ("a lovely film", "pos"),
    ("a dreadful film", "neg"),
    ("great acting", "pos"),
    ("boring plot", "neg"),
    ("superb score", "pos"),
    ("weak ending", "neg"),
] * 10


def write_rows(path: Path, rows: list[tuple[str, str]], fmt: str) -> Path:
    frame = pd.DataFrame(rows, columns=["text", "label"])
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    else:
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_formats_give_the_same_dataset(tmp_path: Path, fmt: str) -> None:
    source = write_rows(tmp_path / f"all.{fmt}", ROWS, fmt)
    config = make_config(
        tmp_path,
        {"uri": str(source), "text_column": "text", "split": {"validation": 0.2, "test": 0.2}},
    )
    result = ingest_data(config, tmp_path / "dataset")
    assert result.rows == {"train": 36, "validation": 12, "test": 12}
    assert result.labels == ["neg", "pos"]
    # Stratified: each split keeps the 50/50 balance exactly.
    assert result.class_balance["test"] == {"neg": 6, "pos": 6}
    texts, labels = load_split(tmp_path / "dataset", "train")
    assert len(texts) == 36
    assert set(labels) == {0, 1}
    # Every format yields the same canonical content, hence the same fingerprint.
    reference = tmp_path / "ref"
    reference.mkdir()
    ref_config = make_config(
        reference,
        {
            "uri": str(write_rows(reference / "all.csv", ROWS, "csv")),
            "text_column": "text",
            "split": {"validation": 0.2, "test": 0.2},
        },
    )
    assert ingest_data(ref_config, reference / "dataset").fingerprint == result.fingerprint


def test_real_sst2_subset(tmp_path: Path, sst2_small: dict[str, Path]) -> None:
    config = make_config(
        tmp_path,
        {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "label_names": {"0": "negative", "1": "positive"},
        },
    )
    out = tmp_path / "dataset"
    result = ingest_data(config, out)
    assert result.rows == {"train": 1080, "validation": 120, "test": 300}
    assert result.labels == ["negative", "positive"]
    assert sorted(p.name for p in out.iterdir()) == [
        "label_map.json",
        "stats.json",
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]
    label_map = load_label_map(out)
    assert label_map.values == ["0", "1"]
    assert label_map.names == ["negative", "positive"]
    stats = storage.read_json(out / "stats.json")
    assert stats["fingerprint"] == result.fingerprint
    assert len(result.fingerprint) == 64
    # SST-2 sentences keep no trailing whitespace and no empty strings.
    texts, _ = load_split(out, "test")
    assert all(t == t.strip() and t for t in texts)


def test_splits_and_caps_are_reproducible(tmp_path: Path, sst2_small: dict[str, Path]) -> None:
    data = {"uri": str(sst2_small["train"]), "max_rows": 600, "split": {"seed": 7}}
    first = ingest_data(make_config(tmp_path / "a", data), tmp_path / "a" / "ds")
    second = ingest_data(make_config(tmp_path / "b", data), tmp_path / "b" / "ds")
    assert first.fingerprint == second.fingerprint
    assert sum(first.rows.values()) == 600
    other = ingest_data(
        make_config(tmp_path / "c", {**data, "split": {"seed": 8}}), tmp_path / "c" / "ds"
    )
    assert other.fingerprint != first.fingerprint
    assert other.rows == first.rows


def test_duplicates_and_overlap_are_reported(tmp_path: Path) -> None:
    train = write_rows(
        tmp_path / "train.csv", [*ROWS, ("a lovely film", "neg"), ("boring plot", "neg")], "csv"
    )
    test = write_rows(tmp_path / "test.csv", [("a lovely film", "pos"), ("new text", "neg")], "csv")
    config = make_config(
        tmp_path, {"train_uri": str(train), "test_uri": str(test), "text_column": "text"}
    )
    result = ingest_data(config, tmp_path / "dataset")
    # 6 distinct texts in the training rows left after the validation carve.
    assert result.duplicate_texts == result.rows["train"] - 6
    assert result.conflicting_duplicates == 1  # "a lovely film" is both pos and neg
    assert result.overlap["test"] == 1


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    rows = [(f"text {i}", str(label)) for i, label in enumerate([10, 2, 1] * 20)]
    config = make_config(
        tmp_path, {"uri": str(write_rows(tmp_path / "d.csv", rows, "csv")), "text_column": "text"}
    )
    assert ingest_data(config, tmp_path / "ds").labels == ["1", "2", "10"]


BAD_CASES = {
    "empty file": (b"", "the file is empty"),
    "header only": (b"text,label\n", "no data rows"),
    "missing text column": (
        b"review,label\ngood,1\nbad,0\n",
        "no column 'text' (columns: review, label); set data.text_column",
    ),
    "missing label column": (
        b"text,y\ngood,1\nbad,0\n",
        "no column 'label' (columns: text, y); set data.label_column",
    ),
    "empty text": (b"text,label\ngood,1\n  ,0\n", "line 3: empty text in column 'text'"),
    "empty label": (b"text,label\ngood,1\nbad,\n", "line 3: empty or NaN label"),
    "nan label": (b"text,label\ngood,1\nbad,NaN\n", "line 3: empty or NaN label"),
    "non-utf8": (
        b"text,label\ngood,1\nb\xe9ad,0\n",
        "line 3: bytes that are not UTF-8 (offset 19); re-encode the file as UTF-8",
    ),
    "ragged csv": (b"text,label\ngood,1\nbad,0,extra\n", "malformed CSV: Expected 2 fields"),
    "single class": (
        b"text,label\n" + b"".join(b"t%d,1\n" % i for i in range(40)),
        "training split has a single class ('1')",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_is_refused_in_one_line_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    content, expected = BAD_CASES[case]
    source = tmp_path / "data.csv"
    source.write_bytes(content)
    config = make_config(tmp_path, {"uri": str(source), "text_column": "text"})
    out = tmp_path / "dataset"
    with pytest.raises(DataError) as info:
        ingest_data(config, out)
    message = str(info.value)
    assert "\n" not in message
    assert str(source) in message
    if expected:
        assert expected in message
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]


def test_nan_label_in_parquet(tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": ["good", "bad", "ok"], "label": [1.0, np.nan, 0.0]})
    frame.to_parquet(tmp_path / "d.parquet")
    config = make_config(tmp_path, {"uri": str(tmp_path / "d.parquet"), "text_column": "text"})
    with pytest.raises(DataError, match=r"row 2: empty or NaN label in column 'label'"):
        ingest_data(config, tmp_path / "ds")


def test_truncated_parquet(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.parquet", ROWS, "parquet")
    path.write_bytes(path.read_bytes()[:-40])
    config = make_config(tmp_path, {"uri": str(path), "text_column": "text"})
    with pytest.raises(DataError, match=r"not a readable parquet file .* truncated"):
        ingest_data(config, tmp_path / "ds")


def test_invalid_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": \n')
    config = make_config(tmp_path, {"uri": str(path), "text_column": "text"})
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        ingest_data(config, tmp_path / "ds")


def test_unknown_extension_asks_for_format(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.txt", ROWS, "csv")
    config = make_config(tmp_path, {"uri": str(path), "text_column": "text"})
    with pytest.raises(DataError, match=r"set data\.format"):
        ingest_data(config, tmp_path / "ds")
    config = make_config(tmp_path, {"uri": str(path), "text_column": "text", "format": "csv"})
    assert ingest_data(config, tmp_path / "ds").rows["train"] > 0


def test_evaluation_labels_unseen_in_training(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", ROWS, "csv")
    test = write_rows(tmp_path / "test.csv", [("x", "pos"), ("y", "meh"), ("z", "meh")], "csv")
    config = make_config(
        tmp_path, {"train_uri": str(train), "test_uri": str(test), "text_column": "text"}
    )
    with pytest.raises(
        DataError,
        match=r"test split has labels never seen in training: "
        r"'meh' \(2 rows\)",
    ):
        ingest_data(config, tmp_path / "ds")


def test_label_names_must_match_the_data(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "d.csv", ROWS, "csv")
    config = make_config(
        tmp_path, {"uri": str(source), "text_column": "text", "label_names": {"0": "negative"}}
    )
    with pytest.raises(DataError, match=r"data.label_names names '0', not a label"):
        ingest_data(config, tmp_path / "ds")


# --- cell types: labels of one kind, texts that are text --------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def ingest_file(tmp_path: Path, path: Path) -> object:
    config = make_config(tmp_path, {"uri": str(path), "text_column": "text"})
    return ingest_data(config, tmp_path / "ds")


TEXTS = [text for text, _ in ROWS]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        # JSON true and 1: str() made them the classes 'True' and '1', with no warning.
        (
            [1, 0, True] + [1, 0] * 20,
            "column 'label' mixes label types: number (line 1: 1), bool (line 3: true)",
        ),
        (
            [0, 1] * 20 + ["1"],
            "column 'label' mixes label types: number (line 1: 0), string (line 41: \"1\")",
        ),
        (
            ["neg", "pos"] * 20 + [False],
            "column 'label' mixes label types: string (line 1: \"neg\"), bool (line 41: false)",
        ),
    ],
    ids=["bool-and-number", "number-and-string", "string-and-bool"],
)
def test_mixed_label_types_are_refused(tmp_path: Path, labels: list, expected: str) -> None:
    records = [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError) as info:
        ingest_file(tmp_path, path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert message.endswith(
        "they would be different classes — write every label the same way (all numbers, all "
        "strings or all true/false)"
    )
    assert not (tmp_path / "ds").exists()


def test_whole_numbers_are_one_label_however_written(tmp_path: Path) -> None:
    # 1 and 1.0 are the same number, so the same label (read as '1'); bools alone are a kind.
    records = [{"text": t, "label": [1, 0.0, 1.0, 0][i % 4]} for i, t in enumerate(TEXTS)]
    assert ingest_file(tmp_path, write_jsonl(tmp_path / "n.jsonl", records)).labels == ["0", "1"]
    records = [{"text": t, "label": i % 2 == 0} for i, t in enumerate(TEXTS)]
    result = ingest_file(tmp_path, write_jsonl(tmp_path / "b.jsonl", records))
    assert result.labels == ["False", "True"]
    frame = pd.DataFrame({"text": TEXTS, "label": [float(i % 3) for i in range(len(TEXTS))]})
    frame.to_parquet(tmp_path / "f.parquet")
    assert ingest_file(tmp_path, tmp_path / "f.parquet").labels == ["0", "1", "2"]


def test_a_null_label_among_numbers_is_missing(tmp_path: Path) -> None:
    records = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    records[4]["label"] = None
    with pytest.raises(DataError, match=r"line 5: empty or NaN label in column 'label'"):
        ingest_file(tmp_path, write_jsonl(tmp_path / "d.jsonl", records))


@pytest.mark.parametrize(
    ("column", "label", "expected"),
    [
        (
            pa.array([{"title": t, "body": t} for t in TEXTS]),
            pa.array([i % 2 for i in range(len(TEXTS))]),
            'row 1: column \'text\' holds a JSON object or struct ({"title": "a lovely film", '
            '"body": "a lovely film"}), not text',
        ),
        (
            pa.array([[t] for t in TEXTS]),
            pa.array([i % 2 for i in range(len(TEXTS))]),
            "row 1: column 'text' holds a list ([\"a lovely film\"]), not text",
        ),
        (
            pa.array([t.encode() for t in TEXTS]),
            pa.array([i % 2 for i in range(len(TEXTS))]),
            "row 1: column 'text' holds binary data (13 bytes), not text",
        ),
        (
            pa.array(TEXTS),
            pa.array([[i % 2] for i in range(len(TEXTS))]),
            "row 1: column 'label' holds a list ([0]), not a label",
        ),
    ],
    ids=["struct-text", "list-text", "binary-text", "list-label"],
)
def test_parquet_cells_that_are_not_text_are_refused(
    tmp_path: Path, column: pa.Array, label: pa.Array, expected: str
) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": column, "label": label}), path)
    with pytest.raises(DataError) as info:
        ingest_file(tmp_path, path)
    message = str(info.value)
    assert message.startswith(f"{path} ")
    assert expected in message
    assert "store one string per row" in message or "point data.label_column" in message


def test_jsonl_text_that_is_an_object_is_refused_with_its_line(tmp_path: Path) -> None:
    records = [{"text": t, "label": "pos"} for t in TEXTS]
    records[6]["text"] = {"en": "a lovely film", "fr": "un beau film"}
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError) as info:
        ingest_file(tmp_path, path)
    assert str(info.value) == (
        f'{path} line 7: column \'text\' holds a JSON object or struct ({{"en": "a lovely '
        'film", "fr": "un beau film"}), not text; store one string per row (join or '
        "flatten it when exporting) or name the text column in the config"
    )


def test_unlabelled_text_that_is_a_list_is_refused(tmp_path: Path) -> None:
    from transferkit.data.readers import read_unlabelled_texts

    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "fine"}, {"text": ["a", "b"]}])
    with pytest.raises(DataError, match=r"u.jsonl line 2: column 'text' holds a list"):
        read_unlabelled_texts(path, str(path), "text")
    write_jsonl(path, [{"text": "fine"}, {"text": "also fine"}])
    assert read_unlabelled_texts(path, str(path), "text") == ["fine", "also fine"]


def test_jsonl_rows_are_named_by_their_line_blank_lines_counted(tmp_path: Path) -> None:
    records = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    records[4]["label"] = "1"
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "\n\n".join(json.dumps(record) for record in records) + "\n")
    with pytest.raises(DataError, match=r"number \(line 2: 0\), string \(line 10: \"1\"\)"):
        ingest_file(tmp_path, path)
    records[4]["label"] = None
    path.write_text("\n" + "\n\n".join(json.dumps(record) for record in records) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl line 10: empty or NaN label"):
        ingest_file(tmp_path, path)
