"""read_table for task: regression and sentence pairs: the real STS Benchmark files (headerless
TSV whose rows may carry extra trailing fields) and every refusal, each in one line that names
the file and the row."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transferkit.data.readers import read_table
from transferkit.errors import DataError

STSB_COLUMNS = ["genre", "file", "year", "id", "score", "sentence1", "sentence2"]


def read_stsb(path: Path, **kwargs: Any) -> pd.DataFrame:
    """An STS Benchmark file as the regression config reads it (format: tsv, data.columns)."""
    return read_table(
        path,
        path.name,
        "tsv",
        "sentence1",
        "score",
        columns=STSB_COLUMNS,
        pair_column="sentence2",
        numeric_labels=True,
        **kwargs,
    )


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    """The one-line message of the DataError that ``call`` raises."""
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pairs_tsv(tmp_path: Path, scores: list[str], name: str = "pairs.tsv") -> Path:
    """A TSV with a header: s1, s2, score; row i on line i + 2."""
    return write_tsv(
        tmp_path / name,
        ["s1\ts2\tscore"] + [f"first {i}\tsecond {i}\t{s}" for i, s in enumerate(scores)],
    )


def read_pairs(path: Path, fmt: str = "tsv", **kwargs: Any) -> pd.DataFrame:
    return read_table(
        path, path.name, fmt, "s1", "score", pair_column="s2", numeric_labels=True, **kwargs
    )


# The real STS Benchmark files.


@pytest.mark.parametrize(("split", "rows"), [("train", 5749), ("dev", 1500), ("test", 1379)])
def test_the_real_stsb_files_read_every_pair_and_score(
    shared_data: Path, split: str, rows: int
) -> None:
    path = shared_data / "stsb" / f"sts-{split}.csv"
    table = read_stsb(path, max_text_chars=100_000)
    assert list(table.columns) == ["text", "text_pair", "label"]
    assert len(table) == rows
    assert table["label"].dtype == np.float64
    assert table["label"].between(0, 5).all()
    # Every row as the files are documented: tab-separated, no quoting, the score in field 5,
    # the two sentences in fields 6 and 7, whatever trails them.
    with path.open(encoding="utf-8", newline="") as file:
        fields = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    expected = [(f[5].strip(), f[6].strip(), float(f[4])) for f in fields]
    assert list(table.itertuples(index=False, name=None)) == expected


def test_the_first_stsb_test_pair_and_a_row_with_extra_fields(shared_data: Path) -> None:
    path = shared_data / "stsb" / "sts-test.csv"
    table = read_stsb(path)
    assert tuple(table.iloc[0]) == (
        "A girl is styling her hair.",
        "A girl is brushing her hair.",
        2.5,
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if line.count("\t") > 6)
    fields = lines[index].split("\t")
    assert len(fields) == 9  # two trailing source notes, ignored
    assert tuple(table.iloc[index]) == (fields[5].strip(), fields[6].strip(), float(fields[4]))


# Headerless files: extra trailing fields are ignored, missing ones refused.


def test_extra_trailing_fields_are_ignored_without_a_header(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_tsv(
        tmp_path / "extra.tsv",
        ['g\tf\t2012\t1\t1.5\tShe said "hi.\tHe said hi."', "g\tf\t2012\t2\t4\ta\tb\tnote\tmore"],
    )
    with caplog.at_level(logging.INFO, logger="transferkit.data.readers"):
        table = read_stsb(path)
    assert table.values.tolist() == [['She said "hi.', 'He said hi."', 1.5], ["a", "b", 4.0]]
    assert (
        "extra.tsv: fields beyond the 7 that data.columns names are ignored in 1 row (the "
        "first at line 2)"
    ) in caplog.text


def test_fewer_fields_than_columns_are_refused_with_the_line(tmp_path: Path) -> None:
    path = write_tsv(
        tmp_path / "short.tsv",
        ["g\tf\t2012\t1\t1.5\ta\tb", "", "g\tf\t2012\t2\t4\tonly one sentence"],
    )
    message = refused(read_stsb, path)
    assert message.startswith("short.tsv line 3: 6 fields where data.columns names 7")
    assert "complete or remove the row" in message


def test_a_short_row_of_a_headerless_csv_is_refused_at_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text('"two\nlines",b,1\nc,2\n', encoding="utf-8")
    columns = ["s1", "s2", "score"]
    message = refused(
        read_table, path, "short.csv", "csv", "s1", "score", columns=columns, numeric_labels=True
    )
    assert message.startswith("short.csv line 3: 2 fields where data.columns names 3")


def test_a_ragged_file_with_a_header_is_still_malformed(tmp_path: Path) -> None:
    path = pairs_tsv(tmp_path, ["1.5", "2.5\tnote"])
    assert refused(read_pairs, path) == (
        "pairs.tsv: malformed TSV: Expected 3 fields in line 3, saw 4"
    )


# Scores.


def test_numeric_strings_ints_and_floats_are_read_as_float64(tmp_path: Path) -> None:
    table = read_pairs(pairs_tsv(tmp_path, ["3.8", " 2 ", "1e-2", "-0.5", ".5", "+4."]))
    assert table["label"].dtype == np.float64
    assert table["label"].tolist() == [3.8, 2.0, 0.01, -0.5, 0.5, 4.0]
    assert table["text_pair"].tolist()[:2] == ["second 0", "second 1"]


@pytest.mark.parametrize(
    ("score", "said"),
    [
        ("", "line 4: empty or NaN label in column 'score'"),
        ("NaN", "line 4: empty or NaN label in column 'score'"),
        ("NA", "line 4: empty or NaN label in column 'score'"),
        ("high", "line 4: column 'score' holds \"high\", not a number"),
        ("3,8", "line 4: column 'score' holds \"3,8\", not a number"),
        ("1_000", "line 4: column 'score' holds \"1_000\", not a number"),
        ("true", "line 4: column 'score' holds \"true\", not a number"),
        ("inf", "line 4: column 'score' holds \"inf\", not a number"),
        ("1e999", "line 4: column 'score' holds \"1e999\", which is not a finite number"),
        ("-1e999", "line 4: column 'score' holds \"-1e999\", which is not a finite number"),
    ],
)
def test_a_score_that_is_not_a_finite_number_is_refused(
    tmp_path: Path, score: str, said: str
) -> None:
    message = refused(read_pairs, pairs_tsv(tmp_path, ["1.5", "2", score, "4"]))
    assert message.startswith(f"pairs.tsv {said}")


def test_jsonl_mixed_numbers_are_read_and_a_boolean_is_refused(tmp_path: Path) -> None:
    rows = [{"s1": "a", "s2": "b", "score": s} for s in (4, 3.25, "4.5", 0)]
    table = read_pairs(write_jsonl(tmp_path / "mixed.jsonl", rows), "jsonl")
    assert table["label"].tolist() == [4.0, 3.25, 4.5, 0.0]
    rows[2]["score"] = True
    message = refused(read_pairs, write_jsonl(tmp_path / "bool.jsonl", rows), "jsonl")
    assert message.startswith("bool.jsonl line 3: column 'score' holds the boolean true, not a")
    assert "task: regression" in message


@pytest.mark.parametrize(
    ("score", "said"),
    [
        ([1, 2], "holds a list ([1, 2]), not a score"),
        ({"mean": 3}, 'holds a JSON object or struct ({"mean": 3}), not a score'),
        (None, "empty or NaN label in column 'score'"),
        (10**400, "which is not a finite number"),
    ],
)
def test_a_jsonl_score_that_is_not_a_number_is_refused(
    tmp_path: Path, score: Any, said: str
) -> None:
    rows: list[dict[str, Any]] = [{"s1": "a", "s2": "b", "score": 1.0}] * 2
    rows.append({"s1": "a", "s2": "b", "score": score})
    message = refused(read_pairs, write_jsonl(tmp_path / "odd.jsonl", rows), "jsonl")
    assert message.startswith("odd.jsonl line 3: ")
    assert said in message


def test_a_parquet_float_column_is_read_and_nan_or_inf_refused(tmp_path: Path) -> None:
    def write(scores: list[float]) -> Path:
        path = tmp_path / "pairs.parquet"
        columns = {"s1": ["a"] * len(scores), "s2": ["b"] * len(scores), "score": scores}
        pq.write_table(pa.table(columns), path)
        return path

    table = read_pairs(write([0.0, 2.5, 5.0]), "parquet")
    assert table["label"].tolist() == [0.0, 2.5, 5.0]
    assert table["label"].dtype == np.float64
    message = refused(read_pairs, write([0.0, float("nan"), 5.0]), "parquet")
    assert message.startswith("pairs.parquet row 2: empty or NaN label in column 'score'")
    message = refused(read_pairs, write([0.0, 1.0, float("-inf")]), "parquet")
    assert message.startswith("pairs.parquet row 3: column 'score' holds -Infinity, which is not")


def test_many_fractional_scores_are_kept_as_scores(tmp_path: Path) -> None:
    scores = [f"{v:.2f}" for v in np.random.default_rng(0).uniform(0, 5, 200)]
    assert read_pairs(pairs_tsv(tmp_path, scores))["label"].nunique() > 20
    # As classes, they are refused with a pointer at task: regression.
    message = refused(read_table, tmp_path / "pairs.tsv", "pairs.tsv", "tsv", "s1", "score")
    assert "a score to predict (regression), not classes; set task: regression" in message
    assert "not supported" not in message


def test_numeric_labels_take_no_label_delimiter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="numeric_labels"):
        read_pairs(pairs_tsv(tmp_path, ["1"]), label_delimiter=",")


# Text pairs.


def test_a_missing_pair_column_names_the_config_key(tmp_path: Path) -> None:
    path = pairs_tsv(tmp_path, ["1"])
    message = refused(read_table, path, "pairs.tsv", "tsv", "s1", "score", pair_column="sentence2")
    assert message == (
        "pairs.tsv: no column 'sentence2' (columns: s1, s2, score); set data.text_pair_column"
    )


def test_an_empty_pair_cell_is_refused_with_its_row(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "pairs.tsv", ["s1\ts2\tscore", "a\tb\t1", "c\t  \t2"])
    assert refused(read_pairs, path) == (
        "pairs.tsv line 3: empty text in column 's2'; fill or remove the row"
    )
    rows = [{"s1": "a", "s2": "b", "score": 1}, {"s1": "c", "s2": None, "score": 2}]
    message = refused(read_pairs, write_jsonl(tmp_path / "pairs.jsonl", rows), "jsonl")
    assert message.startswith("pairs.jsonl line 2: empty text in column 's2'")


def test_a_pair_that_is_not_text_is_refused(tmp_path: Path) -> None:
    rows = [{"s1": "a", "s2": "b", "score": 1}, {"s1": "c", "s2": ["x", "y"], "score": 2}]
    message = refused(read_pairs, write_jsonl(tmp_path / "pairs.jsonl", rows), "jsonl")
    assert message.startswith('pairs.jsonl line 2: column \'s2\' holds a list (["x", "y"])')


def test_an_overlong_pair_text_is_refused(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "pairs.tsv", ["s1\ts2\tscore", "a\tb\t1", f"c\t{'x' * 51}\t2"])
    assert refused(read_pairs, path, max_text_chars=50) == (
        "pairs.tsv line 3: a text of 51 characters in column 's2', above data.max_text_chars "
        "(50); clean the data or raise data.max_text_chars"
    )
    assert len(read_pairs(path, max_text_chars=51)) == 2


def test_pairs_with_class_labels_keep_the_classification_reading(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "nli.tsv", ["s1\ts2\tlabel", "a\tb\tentailment", "c\td\t0"])
    table = read_table(path, "nli.tsv", "tsv", "s1", "label", pair_column="s2")
    assert table.values.tolist() == [["a", "b", "entailment"], ["c", "d", "0"]]
    assert list(table.columns) == ["text", "text_pair", "label"]
