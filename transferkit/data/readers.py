"""Readers for labelled text tables: csv, tsv, jsonl and parquet.

Each reader returns a DataFrame with a string column ``text`` (and ``text_pair`` for sentence
pairs) and a ``label`` column (strings; label sets for multi-label; float64 scores for
regression), in file order, and raises a one-line DataError naming the file, the row and the
fix for anything it cannot read: empty files, non-UTF-8 bytes, malformed rows, missing
columns, empty values.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transferkit.data.dataset import TextPairs
from transferkit.errors import DataError

log = logging.getLogger(__name__)

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def detect_format(name: str, declared: str = "auto") -> str:
    """File format from ``declared`` or, for 'auto', from the file extension."""
    if declared != "auto":
        return declared
    suffix = Path(name).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{name}: cannot tell the format from the extension '{suffix}'; set data.format "
            f"to one of csv, tsv, jsonl, parquet (images: npz, image_folder, image_csv)"
        )
    return FORMATS[suffix]


def missing_column(name: str, column: str, found: Iterable[Any], setting: str) -> str:
    """The one line for a table without a configured column: its first 12 columns, and the
    setting that names it (also ``transferkit validate``'s, transferkit.preflight)."""
    shown = ", ".join(map(str, list(found)[:12]))
    return f"{name}: no column '{column}' (columns: {shown}); set {setting}"


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{name} line {line}: bytes that are not UTF-8 (offset {exc.start}); re-encode "
            "the file as UTF-8"
        ) from None


def _check_field_counts(text: str, name: str, sep: str, columns: list[str]) -> None:
    """Refuse a row of a headerless CSV/TSV with fewer fields than ``columns`` names.

    The parser pads such a row with empty cells, which cannot be told from empty fields
    afterwards, so the fields are counted here with the same delimiter and quoting. Lines the
    parser skips (empty, or spaces only) are skipped. Rows with more fields are counted and
    logged: their extra trailing fields are ignored.

    Raises:
        DataError: one line naming the file, the line, the fields found and the fix.
    """
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))  # a long text is max_text_chars' business
    try:
        reader = csv.reader(
            io.StringIO(text, newline=""),
            delimiter=sep,
            quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,
            strict=False,
        )
        longer, first, end = 0, 0, 0  # rows with extra fields, the first one's line
        for fields in reader:
            line, end = end + 1, reader.line_num  # where the row starts (a field may hold \n)
            if not fields or (len(fields) == 1 and not fields[0].strip(" \t")):
                continue
            if len(fields) < len(columns):
                raise DataError(
                    f"{name} line {line}: {len(fields)} field{'s' if len(fields) != 1 else ''} "
                    f"where data.columns names {len(columns)} ({', '.join(columns)}); complete "
                    "or remove the row, or name only the leading columns in data.columns"
                )
            if len(fields) > len(columns):
                longer += 1
                first = first or line
    except csv.Error as exc:  # the parser read it; do not invent another error
        log.debug("%s: fields not counted (%s)", name, exc)
        return
    finally:
        csv.field_size_limit(limit)
    if longer:
        log.info(
            "%s: fields beyond the %d that data.columns names are ignored in %s (the first "
            "at line %d)",
            name,
            len(columns),
            f"{longer:,} row" + ("s" if longer != 1 else ""),
            first,
        )


def _read_delimited(
    raw: bytes, name: str, sep: str, columns: list[str] | None = None
) -> pd.DataFrame:
    """A CSV/TSV as strings; ``columns`` names the columns of a file without a header row.

    A headerless row may carry extra trailing fields beyond ``columns`` (STS Benchmark's
    source notes): they are ignored. A row with fewer fields than ``columns`` is refused. A
    file with a header row must have as many fields in every row as in its header.

    Raises:
        DataError: empty or malformed file, or a headerless row with too few fields.
    """
    text = _decode(raw, name)
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            header=None if columns else "infer",
            names=columns,
            # Headerless: fields beyond the named columns are dropped. With a header, a row
            # with more fields than names is an error, not an index.
            usecols=range(len(columns)) if columns else None,
            index_col=False,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            # GLUE-style TSVs contain bare quote characters inside sentences.
            quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,
            engine="c",
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: no rows and no header; the file holds no data") from None
    except (pd.errors.ParserError, ValueError) as exc:
        detail = " ".join(str(exc).split()).removeprefix("Error tokenizing data. C error: ")
        raise DataError(
            f"{name}: malformed {'TSV' if sep == chr(9) else 'CSV'}: {detail}"
        ) from None
    if columns:
        _check_field_counts(text, name, sep, columns)
    return frame


def _read_jsonl(raw: bytes, name: str) -> pd.DataFrame:
    text = _decode(raw, name)
    records: list[dict[str, Any]] = []
    numbers: list[int] = []  # the file line of each record, for errors
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{name} line {number}: invalid JSON ({exc.msg}); fix the line"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{name} line {number}: expected a JSON object per line")
        records.append(record)
        numbers.append(number)
    return pd.DataFrame.from_records(records, index=pd.Index(numbers, name="line"))


def _read_parquet(path: Path, name: str) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"{name}: not a readable parquet file ({' '.join(str(exc).split())[:120]}); the "
            "file may be truncated — re-export it"
        ) from None


# Spellings of "no value" that exports write into label columns.
MISSING_LABELS = frozenset({"nan", "NaN", "NAN", "NA", "N/A", "n/a", "null", "NULL", "None"})


def _kind(value: Any) -> str:
    """The kind of one cell: missing, bool, number, string, or what no label or text may be."""
    if value is None or value is pd.NA or value is pd.NaT:
        return "missing"
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, int | float | np.integer | np.floating | decimal.Decimal):
        return "missing" if value != value else "number"  # NaN is the one value unequal to itself
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list | tuple | np.ndarray):
        return "list"
    return type(value).__name__


def _shown(value: Any) -> str:
    """One cell as it reads in the file (JSON), cut short, for an error line."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{len(value):,} bytes"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# How each kind that is neither text nor a label reads in an error.
_ODD = {"list": "a list", "mapping": "a JSON object or struct", "bytes": "binary data"}


def _kinds(column: pd.Series) -> dict[str, int]:
    """Each kind of value in ``column`` and the position of its first cell, in file order."""
    present = column[column.notna().to_numpy()].reset_index(drop=True)
    positions = np.flatnonzero(column.notna().to_numpy())
    if present.empty:
        return {}
    if column.dtype != object:  # a typed column (numbers, bools, strings): one kind
        return {_kind(present.iloc[0]): int(positions[0])}
    types = present.map(type)
    first: dict[str, int] = {}
    for kind_type in types.unique():
        at = int(types.eq(kind_type).to_numpy().argmax())
        kind = _kind(present.iloc[at])
        if kind != "missing" and (kind not in first or positions[at] < first[kind]):
            first[kind] = int(positions[at])
    return dict(sorted(first.items(), key=lambda item: item[1]))


def _check_text_cells(
    frame: pd.DataFrame, column: str, name: str, at: Callable[[int], str]
) -> None:
    """Refuse a text column holding lists, mappings (structs) or bytes: they would be
    stringified into text the backbone was never meant to read."""
    for kind, index in _kinds(frame[column]).items():
        if kind in ("string", "number", "bool"):
            continue
        value = frame[column].iloc[index]
        raise DataError(
            f"{name} {at(index)}: column '{column}' holds "
            f"{_ODD.get(kind, 'a ' + kind)} ({_shown(value)}), not text; store one string "
            "per row (join or flatten it when exporting) or name the text column in the config"
        )


def _check_label_cells(
    frame: pd.DataFrame, column: str, name: str, at: Callable[[int], str]
) -> None:
    """Refuse labels of mixed kinds (true and 1, 1 and "1"): they would become different classes
    whose names look alike. Numbers are one kind: 1 and 1.0 are the same label."""
    kinds = _kinds(frame[column])
    odd = [kind for kind in kinds if kind not in ("string", "number", "bool")]
    if odd:
        index = kinds[odd[0]]
        raise DataError(
            f"{name} {at(index)}: column '{column}' holds "
            f"{_ODD.get(odd[0], 'a ' + odd[0])} ({_shown(frame[column].iloc[index])}), not a "
            "label; a label is one string, number or boolean per row — point "
            "data.label_column at the label"
        )
    if len(kinds) > 1:
        found = ", ".join(
            f"{kind} ({at(index)}: {_shown(frame[column].iloc[index])})"
            for kind, index in kinds.items()
        )
        raise DataError(
            f"{name}: column '{column}' mixes label types: {found}; they would be different "
            "classes — write every label the same way (all numbers, all strings or all "
            "true/false)"
        )


def _cell(value: Any) -> str | None:
    """Normalise one cell to text; None for missing (None, NaN, empty after stripping)."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    text = str(value).strip()
    return text or None


def _frame(path: Path, name: str, fmt: str, columns: list[str] | None = None) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty; point the config at a file with rows")
    if fmt == "parquet":
        frame = _read_parquet(path, name)
    else:
        raw = path.read_bytes()
        frame = (
            _read_jsonl(raw, name)
            if fmt == "jsonl"
            else _read_delimited(raw, name, "\t" if fmt == "tsv" else ",", columns)
        )
    if frame.empty:
        raise DataError(f"{name}: no data rows; the file has a header only")
    return frame


def _position(frame: pd.DataFrame, fmt: str, header: bool = True) -> Callable[[int], str]:
    """How the row at ``index`` is named in errors, 1-based as a person counts: 'line N' of a
    delimited file (after its header, if it has one) or of a JSONL file (blank lines
    counted), 'row N' of Parquet."""
    if fmt in ("csv", "tsv"):
        first = 2 if header else 1
        return lambda index: f"line {index + first}"
    if fmt == "jsonl":  # _read_jsonl indexes the records by their line
        lines = frame.index
        return lambda index: f"line {lines[index]}"
    return lambda index: f"row {index + 1}"


def read_texts(path: Path, name: str, fmt: str, text_column: str) -> list[str]:
    """The non-empty texts of one column of an unlabelled table, in file order.

    Raises:
        DataError: unreadable file or no such column.
    """
    frame = _frame(path, name, fmt)
    if text_column not in frame.columns:
        raise DataError(missing_column(name, text_column, frame.columns, "strategy.text_column"))
    _check_text_cells(frame, text_column, name, _position(frame, fmt))
    return [text for text in map(_cell, frame[text_column].tolist()) if text is not None]


def read_text_pairs(path: Path, name: str, first: str, second: str, fix: str) -> TextPairs:
    """The pairs of two text columns of an unlabelled table, in file order; rows with an
    empty text on either side are left out.

    Raises:
        DataError: not a table, unreadable, or no such column (``fix`` names the setting).
    """
    if path.suffix.lower() in (".txt", ".npz"):
        raise DataError(
            f"{name}: the model reads text pairs, which a {path.suffix} file cannot hold; give "
            f"a csv/tsv/jsonl/parquet table with columns '{first}' and '{second}'"
        )
    fmt = detect_format(name)
    frame = _frame(path, name, fmt)
    for column in (first, second):
        if column not in frame.columns:
            raise DataError(missing_column(name, column, frame.columns, fix))
        _check_text_cells(frame, column, name, _position(frame, fmt))
    cells = [
        (a, b)
        for a, b in zip(map(_cell, frame[first]), map(_cell, frame[second]), strict=True)
        if a is not None and b is not None
    ]
    return TextPairs([a for a, _ in cells], [b for _, b in cells])


def read_unlabelled_texts(path: Path, name: str, text_column: str) -> list[str]:
    """The non-empty texts of a .txt file (UTF-8, one per line) or of one column of a table.

    Raises:
        DataError: not UTF-8, unreadable, or no such column.
    """
    if path.suffix.lower() != ".txt":
        return read_texts(path, name, detect_format(name), text_column)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return [line.strip() for line in lines if line.strip()]


# Separators that exports put between the labels of a multi-label row.
LABEL_DELIMITERS = (",", ";", "|")


def _check_one_class_per_row(labels: pd.Series, name: str, column: str) -> None:
    """Refuse label columns that are not one class per row, which would otherwise train a
    wrong model without a word: several labels joined in one cell (``joy,surprise`` would
    become a class of its own) or numeric scores (every distinct score a class). A column of
    nearly unique values (an id) is told apart where the split needs every label twice
    (ingest).

    Raises:
        DataError: one line naming the file, the column, an example and the fix.
    """
    values = labels.astype(str)
    rows = len(values)
    distinct = set(values.unique())
    for delimiter in LABEL_DELIMITERS:
        held = values[values.str.contains(delimiter, regex=False)]
        if len(held) < max(2, 0.01 * rows):
            continue
        parts = {part.strip() for value in held.unique() for part in value.split(delimiter)}
        if len(parts & distinct) >= 0.5 * len(parts):
            raise DataError(
                f"{name}: {len(held):,} of {rows:,} labels in column '{column}' join several "
                f"labels with '{delimiter}' (e.g. {held.iloc[0]!r}) — a multi-label dataset, "
                f"which task: classification would train as one class per set; set task: "
                f"multi_label (data.label_delimiter: '{delimiter}')"
            )
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all() and (numbers % 1 != 0).any() and numbers.nunique() > 20:
        example = values[numbers % 1 != 0].iloc[0]
        raise DataError(
            f"{name}: column '{column}' holds {numbers.nunique():,} distinct numbers with "
            f"fractions (e.g. {example}) — a score to predict (regression), not classes; "
            "set task: regression to predict the score, or bin the scores into classes or "
            "point data.label_column at a class label"
        )


def _label_set(
    value: Any, delimiter: str, name: str, column: str, where: str
) -> tuple[str, ...] | None:
    """One multi-label cell as its sorted, distinct labels; None for a missing cell.

    A list cell (JSONL, Parquet) holds the labels themselves, an empty list none of them; a
    string cell is split at ``delimiter``; a number is one label.

    Raises:
        DataError: the cell, or one of its items, is not a label (a mapping, a nested list).
    """
    kind = _kind(value)
    if kind == "list":
        items = list(value)
    elif kind in ("string", "number", "bool"):
        text = _cell(value)
        if text is None or text in MISSING_LABELS:
            return None
        items = text.split(delimiter)
    elif kind == "missing":
        return None
    else:
        items = [value]
    odd = next((item for item in items if _kind(item) not in ("string", "number", "bool")), None)
    if odd is not None:
        raise DataError(
            f"{name} {where}: column '{column}' holds {_ODD.get(_kind(odd), 'a ' + _kind(odd))} "
            f"({_shown(odd)}) as a label; a multi-label cell is a list of labels or labels "
            f"joined by data.label_delimiter ('{delimiter}')"
        )
    return tuple(sorted({text for text in map(_cell, items) if text is not None}))


# A score as text: decimal digits with an optional sign, point and exponent ("3.8", "-2",
# "1e-2"); not "inf", "nan", "1_000", "0x1F", "3,8" or digits of other scripts.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _score(value: Any, name: str, column: str, where: str) -> float | None:
    """One regression target as a float; None for a missing cell (None, NaN, empty, 'NA').

    Raises:
        DataError: the cell is a boolean, a list, a mapping, bytes, text that is not a
            number, or not finite — one line naming the file, the row, the column, the value
            and the fix.
    """
    kind = _kind(value)
    if kind == "missing":
        return None
    fix = "write one number per row (e.g. 3.8) or remove the row"
    if kind == "string":
        text = value.strip()
        if not text or text in MISSING_LABELS:
            return None
        if not _NUMBER.fullmatch(text):
            raise DataError(
                f"{name} {where}: column '{column}' holds {_shown(value)}, not a number; "
                f"task: regression reads a score per row — {fix}, with '.' as the decimal "
                "point (a column of classes wants task: classification)"
            )
        number = float(text)
    elif kind == "number":
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf
    elif kind == "bool":
        raise DataError(
            f"{name} {where}: column '{column}' holds the boolean {_shown(value)}, not a "
            f"score; task: regression reads a number per row — {fix} (true/false is a class: "
            "task: classification)"
        )
    else:
        raise DataError(
            f"{name} {where}: column '{column}' holds {_ODD.get(kind, 'a ' + kind)} "
            f"({_shown(value)}), not a score; task: regression reads a number per row — {fix}, "
            "or point data.label_column at the score"
        )
    if not math.isfinite(number):
        raise DataError(
            f"{name} {where}: column '{column}' holds {_shown(value)}, which is not a finite "
            f"number; a score must be finite — {fix}"
        )
    return number


def read_table(
    path: Path,
    name: str,
    fmt: str,
    text_column: str,
    label_column: str,
    max_text_chars: int | None = None,
    label_delimiter: str | None = None,
    columns: list[str] | None = None,
    pair_column: str | None = None,
    numeric_labels: bool = False,
) -> pd.DataFrame:
    """Read a labelled table into ``text`` (and ``text_pair``) string columns and a ``label``.

    Args:
        path: local file.
        name: how to call the file in errors (its URI).
        fmt: csv, tsv, jsonl or parquet.
        text_column: column with the input text.
        label_column: column with the label.
        max_text_chars: longest text accepted (``data.max_text_chars``); None: no limit.
        label_delimiter: None for one label per row (strings); for ``task: multi_label`` what
            joins a row's labels in one string cell: the ``label`` column then holds tuples
            of sorted distinct labels (lists in JSONL/Parquet are read as they are).
        columns: the column names of a CSV/TSV without a header row (``data.columns``); a
            row's fields beyond them are ignored, a row with fewer fields is refused.
        pair_column: column with the second text of a pair (``data.text_pair_column``),
            returned as ``text_pair`` and checked like the text; None: one text per row.
        numeric_labels: ``task: regression``: the label column holds a number per row (ints,
            floats or numeric strings), returned as float64.

    Returns:
        The rows in file order: columns ``text``, ``text_pair`` (with ``pair_column``) and
        ``label``.

    Raises:
        DataError: unreadable file, missing column, empty text or label, a label that is not
            a finite number (``numeric_labels``), or a text longer than ``max_text_chars``
            (with the row).
        ValueError: ``numeric_labels`` together with ``label_delimiter``.
    """
    if numeric_labels and label_delimiter is not None:
        raise ValueError("read_table: numeric_labels (regression) takes no label_delimiter")
    frame = _frame(path, name, fmt, columns)
    wanted = [(text_column, "text_column"), (label_column, "label_column")]
    if pair_column is not None:
        wanted.insert(1, (pair_column, "text_pair_column"))
    for column, key in wanted:
        if column not in frame.columns:
            raise DataError(missing_column(name, column, frame.columns, f"data.{key}"))
    at = _position(frame, fmt, header=not columns)
    text_columns = {"text": text_column}
    if pair_column is not None:
        text_columns["text_pair"] = pair_column
    for column in text_columns.values():
        _check_text_cells(frame, column, name, at)
    texts = {
        key: [_cell(v) for v in frame[column].tolist()] for key, column in text_columns.items()
    }
    labels: list[Any]
    if numeric_labels:
        labels = [
            _score(v, name, label_column, at(i)) for i, v in enumerate(frame[label_column].tolist())
        ]
    elif label_delimiter is None:
        _check_label_cells(frame, label_column, name, at)
        labels = [_cell(v) for v in frame[label_column].tolist()]
        labels = [None if label in MISSING_LABELS else label for label in labels]
    else:
        labels = [
            _label_set(v, label_delimiter, name, label_column, at(i))
            for i, v in enumerate(frame[label_column].tolist())
        ]
    for index, label in enumerate(labels):
        for key, column in text_columns.items():
            if texts[key][index] is None:
                raise DataError(
                    f"{name} {at(index)}: empty text in column '{column}'; fill or remove the row"
                )
        if label is None:
            empty_set = (
                ""
                if label_delimiter is None
                else " (a row with no labels is an empty list in JSONL or Parquet)"
            )
            raise DataError(
                f"{name} {at(index)}: empty or NaN label in column "
                f"'{label_column}'; label or remove the row{empty_set}"
            )
    table = pd.DataFrame(
        {
            **texts,
            "label": np.asarray(labels, dtype=np.float64) if numeric_labels else labels,
        }
    )
    if label_delimiter is None and not numeric_labels:
        _check_one_class_per_row(table["label"], name, label_column)
    if max_text_chars is not None:
        for key, column in text_columns.items():
            lengths = table[key].str.len()
            too_long = lengths[lengths > max_text_chars]
            if not too_long.empty:
                index, length = int(too_long.index[0]), int(too_long.iloc[0])
                raise DataError(
                    f"{name} {at(index)}: a text of {length:,} characters in column "
                    f"'{column}', above data.max_text_chars ({max_text_chars:,}); clean the "
                    "data or raise data.max_text_chars"
                )
    return table
