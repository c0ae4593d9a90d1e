"""transferkit submit and schedule against a stand-in KFP API server (tests/stand_ins): what
the server receives parses as a real one would parse it, and every failure is one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transferkit.components.images import CUDA_IMAGE

from tests.stand_ins.kfp_server import KfpStandIn, serve
from transferkit.cli import main
from transferkit.config import load_config
from transferkit.step_inputs import step_arguments

ROOT = Path(__file__).resolve().parents[2]
GPU_EXAMPLE = str(ROOT / "examples" / "sst2-gpu.yaml")


@pytest.fixture
def kfp() -> Iterator[KfpStandIn]:
    state, server = serve()
    yield state
    server.shutdown()


def executors(body: dict) -> dict:
    spec = body["pipeline_spec"]
    return spec.get("pipeline_spec", spec)["deploymentSpec"]["executors"]


def test_submit_creates_one_run_with_the_config_and_prints_its_url(
    kfp: KfpStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["submit", GPU_EXAMPLE, "--host", kfp.host, "--experiment", "sst2", "--no-cache"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(kfp.runs) == 1
    run = kfp.runs[0]
    assert (
        out == f"run {run['run_id']} in experiment sst2: {kfp.host}/#/runs/details/{run['run_id']}"
    )
    assert [e["display_name"] for e in kfp.experiments.values()] == ["sst2"]
    assert run["display_name"] == "sst2-sentiment-full_finetune"
    # Each step's part of the config (transferkit.step_inputs), and the sources' stamps.
    parameters = run["runtime_config"]["parameters"]
    assert parameters == {
        **step_arguments(load_config(GPU_EXAMPLE)),
        "data_stamp": "",
        "backbone_stamp": "",
    }
    assert executors(run)["exec-train"]["container"]["image"] == CUDA_IMAGE
    assert run["service_account"] == "transferkit-pipeline-runner"
    # A second submission finds the experiment instead of creating another.
    assert main([*args, "--run-name", "again"]) == 0
    assert len(kfp.experiments) == 1
    assert [r["display_name"] for r in kfp.runs] == ["sst2-sentiment-full_finetune", "again"]


def test_schedule_creates_a_recurring_run_in_kfp_cron_form(
    kfp: KfpStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["schedule", GPU_EXAMPLE, "--host", kfp.host, "--cron", "0 3 * * 1"]
    assert main(args) == 0
    (job,) = kfp.recurring_runs
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"  # seconds field added
    assert job["max_concurrency"] in (1, "1")
    assert job["display_name"] == "sst2-sentiment-retrain"
    assert job["service_account"] == "transferkit-pipeline-runner"
    assert job["runtime_config"]["parameters"]["data_stamp"] == ""
    assert kfp.host in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "expected", "status"),
    [
        (["--cron", "every monday"], "--cron 'every monday' is not a cron expression", 2),
        (["--cron", "0 3 * * 1", "--max-concurrency", "0"], "--max-concurrency 0", 2),
        (
            ["--cron", "0 3 * * 1", "--set", "data.train_uri=/tmp/train.tsv"],
            "data.train_uri is a path on this machine (/tmp/train.tsv); cluster pods cannot "
            "read it — upload it to object storage and give its s3:// URI",
            2,
        ),
    ],
)
def test_schedule_rejections_are_one_line_and_create_nothing(
    kfp: KfpStandIn, capsys: pytest.CaptureFixture[str], extra: list, expected: str, status: int
) -> None:
    assert main(["schedule", GPU_EXAMPLE, "--host", kfp.host, *extra]) == status
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert expected in err
    assert kfp.recurring_runs == []
    assert kfp.experiments == {}


def test_unreachable_or_refusing_server_is_a_one_line_error(
    kfp: KfpStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    kfp.refuse_runs = True
    assert main(["submit", GPU_EXAMPLE, "--host", kfp.host, "--no-cache"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: Kubeflow Pipelines at {kfp.host} refused the run:")
    assert "\n" not in err
    assert kfp.runs == []
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    assert main(["submit", GPU_EXAMPLE, "--host", closed, "--no-cache"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot reach Kubeflow Pipelines at {closed}")
    assert "\n" not in err
