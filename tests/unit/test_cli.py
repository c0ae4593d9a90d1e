"""The CLI's fast commands and the run log parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from transferkit import __version__
from transferkit.cli import main
from transferkit.runner import _Events

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "examples" / "sst2-quickstart.yaml")


def test_version_is_the_packages(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"transferkit {version('transferkit')}\n"


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", QUICKSTART]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {QUICKSTART} — linear_probe on ../shared/data/sst2/train.tsv")


def test_validate_lists_every_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "validate",
            QUICKSTART,
            "--set",
            "training.epochs=0",
            "--set",
            "training.lr=1",
            "--set",
            "strategy.name=magic",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 3
    assert all(line.startswith(f"error: {QUICKSTART}: ") for line in err)
    assert any("training.lr: unknown key" in line for line in err)


def run_quickstart(work: Path, *overrides: str) -> int:
    args = ["run", QUICKSTART, "--set", f"runtime.work_dir={work}"]
    for override in overrides:
        args += ["--set", override]
    return main(args)


def test_run_with_bad_config_exits_2_without_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_quickstart(tmp_path / "w", "training.batch_size=0")
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "training.batch_size: Input should be greater than" in err
    assert not (tmp_path / "w").exists()


def test_run_refuses_several_nodes_locally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_quickstart(tmp_path / "w", "strategy.name=full_finetune", "training.nodes=2")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # The header names the version that ran.
    assert err[0].endswith(f"work dir {tmp_path / 'w'} (transferkit {__version__})"), err[0]
    assert err[-1].startswith("error: training.nodes 2: several nodes train on a cluster")
    assert not (tmp_path / "w" / "mlflow.db").exists()


def test_run_with_missing_data_exits_1_before_any_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_quickstart(tmp_path / "w", f"data.train_uri={tmp_path / 'missing.tsv'}")
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: {tmp_path / 'missing.tsv'}: no such file or folder; check the path" in err
    assert not (tmp_path / "w" / "mlflow.db").exists()


def test_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == {
        "task",
        "data",
        "backbone",
        "backbone_selection",
        "sweep",
        "strategy",
        "training",
        "evaluation",
        "registry",
        "storage",
        "runtime",
        "resources",
        "kubernetes",
        "trigger",
    }
    assert schema["required"] == ["data"]


def test_predict_from_a_model_folder(probe_run: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    _, artifacts, _ = probe_run
    model = str(artifacts / "model")
    assert main(["predict", model, "a wonderful, moving film", "a dull, lifeless mess"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[-2] == "positive"
    assert lines[1].split()[-2] == "negative"
    assert main(["predict", model, "--json", "an absolute triumph"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["text"] == "an absolute triumph"
    assert records[0]["label"] == "positive"
    assert records[0]["p_negative"] + records[0]["p_positive"] == pytest.approx(1.0)


def test_predict_refuses_a_missing_store_and_an_unknown_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    store = tmp_path / "m.db"
    args = ["predict", "models:/nope@champion", "text", "--tracking-uri", f"sqlite:///{store}"]
    assert main(args) == 1
    assert capsys.readouterr().err == (
        f"error: no MLflow store at {store}; run a pipeline first or pass --tracking-uri\n"
    )
    assert not store.exists()
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}").search_experiments()
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot load models:/nope@champion from sqlite:///")
    assert "Registered Model with name=nope not found" in last


def test_log_parser_times_steps_and_finds_the_cause() -> None:
    seen: list[str] = []
    events = _Events(on_line=seen.append)
    lines = [
        "04:42:06.623 - INFO - Executing task \x1b[96m'ingest-data'\x1b[0m",
        "    transferkit INFO transferkit.data.ingest | read 1,200 rows",
        "04:42:08.403 - INFO - Task \x1b[96m'ingest-data'\x1b[0m finished with status "
        "\x1b[92mSUCCESS\x1b[0m",
        "04:42:08.406 - INFO - Executing task \x1b[96m'fetch-backbone'\x1b[0m",
        "    Traceback (most recent call last):",
        "    transferkit.errors.BackboneError: /m: no tokenizer files; save the tokenizer",
        "04:42:09.000 - INFO - Task \x1b[96m'fetch-backbone'\x1b[0m finished with status "
        "\x1b[91mFAILURE\x1b[0m",
        "04:42:14.000 - INFO - Executing task \x1b[96m'fetch-backbone'\x1b[0m",
    ]
    for line in lines:
        events.feed(line)
    assert seen[0] == "start ingest_data"
    assert seen[1] == "log INFO transferkit.data.ingest read 1,200 rows"
    assert seen[2].startswith("done ingest_data ")
    assert seen[4].startswith("failed fetch_backbone ")
    assert seen[5] == "retry fetch_backbone 2"
    assert events.failed == "fetch_backbone"
    assert events.cause() == "/m: no tokenizer files; save the tokenizer"


def test_cached_steps_are_announced_by_depth() -> None:
    seen: list[str] = []
    events = _Events(on_line=seen.append)
    events.feed("Executing task 'evaluate'")
    assert seen == [
        "cached ingest_data",
        "cached fetch_backbone",
        "cached extract_features",
        "cached train",
        "start evaluate",
    ]
    events.announce_cached()
    assert seen[-1] == "cached register_model"


def test_after_a_failure_the_exit_step_announces_nothing_cached() -> None:
    """close_run runs after a failed step (it is the exit handler's exit step): the steps
    between them never ran, and were not served from the cache either."""
    seen: list[str] = []
    events = _Events(on_line=seen.append)
    for line in (
        "Executing task 'open-run'",
        "Task 'open-run' finished with status SUCCESS",
        "Executing task 'ingest-data'",
        "    transferkit.errors.DataError: train.tsv: no column 'review'; set data.text_column",
        "Task 'ingest-data' finished with status FAILURE",
        "Executing task 'close-run'",
        "    transferkit.errors.RegistryError: MLflow at http://m is unreachable; check it",
        "Task 'close-run' finished with status FAILURE",
    ):
        events.feed(line)
    events.announce_cached()
    assert [re.sub(r" [0-9.]+$", "", line) for line in seen] == [
        "start open_run",
        "done open_run",
        "start ingest_data",
        "failed ingest_data",
        "start close_run",
        "failed close_run",
    ]
    # The exit step failing after it (MLflow down) does not hide the run's cause.
    assert events.failed == "ingest_data"
    assert events.cause() == "train.tsv: no column 'review'; set data.text_column"


@pytest.mark.parametrize(("configure", "frozen"), [(True, True), (False, False)])
def test_a_step_process_skips_the_last_garbage_collection(configure: bool, frozen: bool) -> None:
    """configure_logging (every step's first call) freezes the heap at exit, after every
    other exit handler: the 1-1.5 s final collection of a torch process is not paid."""
    import subprocess
    import sys

    script = (
        "import atexit, gc\n"
        # Registered before configure_logging, so it runs after its handler (LIFO).
        "atexit.register(lambda: print('frozen' if gc.get_freeze_count() else 'not frozen'))\n"
        "from transferkit.cli import configure_logging\n"
        + ("configure_logging(); configure_logging()\n" if configure else "")
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == ("frozen" if frozen else "not frozen")
