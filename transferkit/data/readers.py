"""Readers for labelled text tables: csv, tsv, jsonl and parquet.

Each reader returns a DataFrame with two string columns, ``text`` and ``label``, in file
order, and raises a one-line DataError naming the file, the row and the fix for anything it
cannot read: empty files, non-UTF-8 bytes, malformed rows, missing columns, empty values.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from transferkit.errors import DataError

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


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{name} line {line}: bytes that are not UTF-8 (offset {exc.start}); re-encode "
            "the file as UTF-8"
        ) from None


def _read_delimited(raw: bytes, name: str, sep: str) -> pd.DataFrame:
    text = _decode(raw, name)
    try:
        return pd.read_csv(
            io.StringIO(text),
            sep=sep,
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


def _read_jsonl(raw: bytes, name: str) -> pd.DataFrame:
    text = _decode(raw, name)
    records: list[dict[str, Any]] = []
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
    return pd.DataFrame.from_records(records)


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


def _frame(path: Path, name: str, fmt: str) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty; point the config at a file with rows")
    if fmt == "parquet":
        frame = _read_parquet(path, name)
    else:
        raw = path.read_bytes()
        frame = (
            _read_jsonl(raw, name)
            if fmt == "jsonl"
            else _read_delimited(raw, name, "\t" if fmt == "tsv" else ",")
        )
    if frame.empty:
        raise DataError(f"{name}: no data rows; the file has a header only")
    return frame


def read_texts(path: Path, name: str, fmt: str, text_column: str) -> list[str]:
    """The non-empty texts of one column of an unlabelled table, in file order.

    Raises:
        DataError: unreadable file or no such column.
    """
    frame = _frame(path, name, fmt)
    if text_column not in frame.columns:
        found = ", ".join(map(str, frame.columns[:12]))
        raise DataError(
            f"{name}: no column '{text_column}' (columns: {found}); set strategy.text_column"
        )
    return [text for text in map(_cell, frame[text_column].tolist()) if text is not None]


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


def read_table(
    path: Path,
    name: str,
    fmt: str,
    text_column: str,
    label_column: str,
    max_text_chars: int | None = None,
) -> pd.DataFrame:
    """Read a labelled table into ``text``/``label`` string columns.

    Args:
        path: local file.
        name: how to call the file in errors (its URI).
        fmt: csv, tsv, jsonl or parquet.
        text_column: column with the input text.
        label_column: column with the label.
        max_text_chars: longest text accepted (``data.max_text_chars``); None: no limit.

    Raises:
        DataError: unreadable file, missing column, empty text or label, or a text longer
            than ``max_text_chars`` (with the row).
    """
    frame = _frame(path, name, fmt)
    for column, key in ((text_column, "text_column"), (label_column, "label_column")):
        if column not in frame.columns:
            found = ", ".join(map(str, frame.columns[:12]))
            raise DataError(f"{name}: no column '{column}' (columns: {found}); set data.{key}")
    texts = [_cell(v) for v in frame[text_column].tolist()]
    labels = [_cell(v) for v in frame[label_column].tolist()]
    labels = [None if label in MISSING_LABELS else label for label in labels]
    # Rows are reported 1-based, as a person counts them; delimited files add the header line.
    offset = 2 if fmt in ("csv", "tsv") else 1
    unit = "line" if fmt in ("csv", "tsv", "jsonl") else "row"
    for index, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if text is None:
            raise DataError(
                f"{name} {unit} {index + offset}: empty text in column '{text_column}'; fill "
                "or remove the row"
            )
        if label is None:
            raise DataError(
                f"{name} {unit} {index + offset}: empty or NaN label in column "
                f"'{label_column}'; label or remove the row"
            )
    table = pd.DataFrame({"text": texts, "label": labels})
    if max_text_chars is not None:
        lengths = table["text"].str.len()
        too_long = lengths[lengths > max_text_chars]
        if not too_long.empty:
            index, length = int(too_long.index[0]), int(too_long.iloc[0])
            raise DataError(
                f"{name} {unit} {index + offset}: a text of {length:,} characters in column "
                f"'{text_column}', above data.max_text_chars ({max_text_chars:,}); clean the "
                "data or raise data.max_text_chars"
            )
    return table
