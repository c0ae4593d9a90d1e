"""`transferkit validate` checks the sources a config names, without running a step, with the
line the run would stop with (transferkit.preflight)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import make_config
from transferkit.cli import main
from transferkit.data.readers import read_table
from transferkit.errors import DataError
from transferkit.preflight import problems

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "sst2-quickstart.yaml"


def table(tmp_path: Path, fmt: str) -> Path:
    frame = pd.DataFrame({"sentence": ["a fine film", "a dull film"], "label": [1, 0]})
    path = tmp_path / f"rows.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    else:
        frame.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    return path


def validate(capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, list[str]]:
    args = ["validate", str(QUICKSTART)]
    for override in overrides:
        args += ["--set", override]
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


MISSING = "no such file or folder; check the path"
SCHEMES = "use a path, file://, s3://"


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("data.train_uri={tmp}/missing.tsv", f"{{tmp}}/missing.tsv: {MISSING}"),
        ("backbone.uri={tmp}/no-model", f"{{tmp}}/no-model: {MISSING}"),
        ("backbone.uri=ftp://models/x", f"ftp://models/x: unsupported scheme 'ftp://'; {SCHEMES}"),
        ("data.test_uri=gs://b/dev.tsv", f"gs://b/dev.tsv: unsupported scheme 'gs://'; {SCHEMES}"),
    ],
    ids=["missing-data-file", "missing-backbone-folder", "backbone-scheme", "data-scheme"],
)
def test_validate_catches_what_run_would_stop_at(
    override: str, line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = validate(capsys, override.format(tmp=tmp_path))
    assert code == 1
    assert err == [f"error: {line.format(tmp=tmp_path)}"]
    # `run` stops at the same line, before any step.
    code = main(
        ["run", str(QUICKSTART), "--set", override.format(tmp=tmp_path),
         "--set", f"runtime.work_dir={tmp_path / 'work'}"]
    )  # fmt: skip
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {line.format(tmp=tmp_path)}"


def test_the_source_checks_load_no_model_code(tmp_path: Path) -> None:
    """What makes them quick (issue: under a second): a missing data file, a missing backbone
    folder and an unknown scheme are found without importing torch or transformers, which
    the family check after them needs (2 s of imports here)."""
    import subprocess
    import sys

    probe = (
        "import sys; from transferkit.cli import main; code = main(sys.argv[1:]); "
        "print(code, sorted(m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules))"
    )
    for override in (
        f"data.train_uri={tmp_path}/missing.tsv",
        f"backbone.uri={tmp_path}/no-model",
        "data.test_uri=gs://b/dev.tsv",
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, "validate", str(QUICKSTART), "--set", override],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.stdout.strip() == "1 []", (override, done.stdout, done.stderr)
        assert done.stderr.startswith("error: ")


def test_validate_lists_every_source_problem_and_says_ok_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = validate(
        capsys, f"data.train_uri={tmp_path}/a.tsv", f"data.test_uri={tmp_path}/b.tsv"
    )
    assert code == 1
    assert err == [
        f"error: {tmp_path}/a.tsv: no such file or folder; check the path",
        f"error: {tmp_path}/b.tsv: no such file or folder; check the path",
    ]
    assert main(["validate", str(QUICKSTART), "--offline"]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {QUICKSTART}")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
@pytest.mark.parametrize(
    ("key", "column"),
    [("data.text_column", "review"), ("data.label_column", "stars"),
     ("data.text_pair_column", "hypothesis")],
)  # fmt: skip
def test_a_column_missing_from_the_header_is_the_readers_own_line(
    fmt: str, key: str, column: str, tmp_path: Path
) -> None:
    path = table(tmp_path, fmt)
    fields = {"text_column": "sentence", "label_column": "label", key.split(".")[1]: column}
    config = make_config(tmp_path, {"train_uri": str(path), "test_uri": str(path), **fields})
    found = problems(config)
    assert len(found) == 2  # once per split that names the file
    with pytest.raises(DataError) as read:
        read_table(
            path, str(path), fmt, config.data.text_column, config.data.label_column,
            pair_column=config.data.text_pair_column,
        )  # fmt: skip
    assert found[0] == str(read.value)


def test_a_table_with_its_columns_and_image_arrays_pass(tmp_path: Path) -> None:
    path = table(tmp_path, "csv")
    config = make_config(
        tmp_path, {"train_uri": str(path), "test_uri": str(path), "text_column": "sentence"}
    )
    assert problems(config) == []
    arrays = tmp_path / "images.npz"
    arrays.write_bytes(b"")  # existence is checked; the reader checks the content
    images = make_config(tmp_path, {"uri": str(arrays)})
    assert problems(images) == []
