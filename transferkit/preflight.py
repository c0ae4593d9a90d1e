"""What ``transferkit validate`` checks beyond the config's own fields, without running a step.

Every source the config names — the data files, the unlabelled texts of domain adaptation, the
backbone(s) — must be in a location some step can read: a supported scheme, a local path that
exists and is readable, an S3 object or prefix that exists (checked only where credentials are
at hand and the check is not ``offline``), and a table whose header holds the configured
columns. Each problem is one line, the same line the run would stop with; all are listed.
Nothing is downloaded and no file is read beyond its header.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from transferkit import storage
from transferkit.backbones import hub
from transferkit.config import PipelineConfig
from transferkit.errors import StorageError, TransferkitError

# Enough of a delimited or JSONL file for its header row / first record.
HEAD_BYTES = 1 << 16
TABLES = frozenset({"csv", "tsv", "jsonl", "parquet"})


def problems(config: PipelineConfig, offline: bool = False) -> list[str]:
    """Every problem with the config's sources, one line each; empty when all look readable.

    Args:
        config: a validated configuration.
        offline: skip what needs the network (S3 objects).
    """
    found: list[str] = []
    s3 = not offline and _has_s3_credentials()
    for uri, role in _sources(config):
        try:
            if role == "backbone" and hub.is_hub_uri(uri):
                continue  # its spelling is checked with the config; the Hub is not asked
            location = storage.parse(uri)
            if location.scheme == "s3":
                if s3:
                    storage.stamp(uri, config.storage)  # ETags only: nothing is downloaded
                continue
            _readable(uri, storage.local_path(uri))
            if role in ("data", "unlabelled") and HEADER_CHECKED[config.data.modality]:
                found.extend(_columns(config, uri, role))
        except TransferkitError as error:
            found.append(str(error))
    return found


# Which kinds of data (data.modality) have their configured columns checked against the table's
# header here: an image table's columns are resolved by its reader (folders, npz, path columns).
HEADER_CHECKED = {"text": True, "image": False}


def _sources(config: PipelineConfig) -> Iterator[tuple[str, str]]:
    data = config.data
    for uri in (data.uri, data.train_uri, data.validation_uri, data.test_uri):
        if uri:
            yield uri, "data"
    unlabelled = getattr(config.strategy, "unlabelled_uri", None)
    if unlabelled:
        yield unlabelled, "unlabelled"
    if config.backbone_selection is not None:
        for candidate in config.backbone_selection.candidates:
            yield candidate.uri, "backbone"
    else:
        yield config.backbone.uri, "backbone"


def _has_s3_credentials() -> bool:
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"):
        return True
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    return Path(shared).expanduser().exists()


def _readable(uri: str, path: Path) -> None:
    if not path.exists():
        raise storage.not_found(uri)
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise StorageError(f"{uri}: not readable by this user; check its permissions")


def _columns(config: PipelineConfig, uri: str, role: str) -> list[str]:
    """The configured columns missing from a local table's header, as the reader words it."""
    from transferkit.data.readers import detect_format, missing_column

    path = storage.local_path(uri)
    data = config.data
    fmt = detect_format(uri, data.format if role == "data" else "auto")
    if fmt not in TABLES or path.is_dir():
        return []
    header = _header(path, fmt, data.columns if role == "data" else None)
    if header is None:
        return []
    if role == "unlabelled":
        wanted = [(getattr(config.strategy, "text_column", "text"), "strategy.text_column")]
    else:
        wanted = [(data.text_column, "data.text_column")]
        if data.text_pair_column:
            wanted.append((data.text_pair_column, "data.text_pair_column"))
        wanted.append((data.label_column, "data.label_column"))
    return [
        missing_column(uri, column, header, key) for column, key in wanted if column not in header
    ]


def _header(path: Path, fmt: str, columns: list[str] | None) -> list[str] | None:
    """The column names of a table from its first bytes (Parquet: its schema); None where they
    cannot be told without reading it (the reader then reports)."""
    if columns:
        return list(columns)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        with path.open("rb") as handle:
            head = handle.read(HEAD_BYTES).decode("utf-8-sig", errors="replace")
    except Exception:
        return None
    first = head.splitlines()[0] if head.strip() else ""
    if fmt == "jsonl":
        try:
            record = json.loads(first)
        except ValueError:
            return None
        return list(record) if isinstance(record, dict) else None
    row = next(csv.reader(io.StringIO(first), delimiter="\t" if fmt == "tsv" else ","), [])
    return [name.strip() for name in row] or None
