"""transferkit.tracking against a real (SQLite) MLflow store: one run per pipeline run, found
again by a retried step, ended FINISHED or FAILED, the runner's one-line error written over
KFP's; bad run ids and an unreachable server are one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import make_config
from transferkit.config import PipelineConfig
from transferkit.errors import RegistryError
from transferkit.tracking import (
    LOCAL_RUN_ENV,
    PIPELINE_RUN_ENV,
    TRACKING_URI_ENV,
    close_run,
    one_line,
    open_run,
    record_failure,
    report_failures,
)


@pytest.fixture
def config(tmp_path: Path) -> PipelineConfig:
    return make_config(tmp_path, {"uri": str(tmp_path / "d.tsv")}, registry={"model_name": "m"})


def store(config: PipelineConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=config.tracking_uri)


def test_a_retried_first_step_finds_the_run_it_opened(
    config: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOCAL_RUN_ENV, "20261203-120000-000001")
    first = open_run(config, "kfp-run-1", "transferkit-transfer-learning")
    assert open_run(config, "kfp-run-1", "transferkit-transfer-learning") == first
    other = open_run(config, "kfp-run-2", "transferkit-transfer-learning")
    assert other != first
    run = store(config).get_run(first)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "linear_probe-kfp-run-1"
    assert run.data.tags["transferkit.pipeline_run_id"] == "kfp-run-1"
    assert run.data.tags["transferkit.local_run"] == "20261203-120000-000001"
    assert run.data.tags["mlflow.source.name"] == "transferkit-transfer-learning"
    assert run.data.params["registry.model_name"] == "m"
    assert run.data.params["strategy.name"] == "linear_probe"


def test_closing_ends_it_finished_or_failed_and_the_runner_writes_the_cause(
    config: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOCAL_RUN_ENV, "stamp-a")
    done = open_run(config, "ok", "p")
    assert close_run(config, "ok", "SUCCEEDED") == "FINISHED"
    assert store(config).get_run(done).info.status == "FINISHED"
    assert close_run(config, "ok", "SUCCEEDED") == "FINISHED"  # a retry changes nothing

    monkeypatch.setenv(LOCAL_RUN_ENV, "stamp-b")
    failed = open_run(config, "bad", "p")
    assert close_run(config, "bad", "FAILED", "Task exit-handler-1 failed.") == "FAILED"
    assert store(config).get_run(failed).data.tags["transferkit.error"] == (
        "Task exit-handler-1 failed."
    )
    # The runner knows the cause; KFP's message does not: the runner's line replaces it.
    cause = "ingest_data failed: train.tsv: no column 'review'; set data.text_column"
    assert record_failure(config, "stamp-b", "ingest_data", cause) == "FAILED"
    run = store(config).get_run(failed)
    assert run.info.status == "FAILED"
    assert run.data.tags["transferkit.error"] == cause
    assert run.data.tags["transferkit.failed_step"] == "ingest_data"
    # The run that succeeded is untouched.
    assert "transferkit.error" not in store(config).get_run(done).data.tags


def test_no_run_to_close_is_a_warning_not_an_error(config: PipelineConfig) -> None:
    assert close_run(config, "never-opened", "FAILED", "boom") is None


def test_a_run_id_that_is_not_an_id_is_refused(config: PipelineConfig) -> None:
    with pytest.raises(RegistryError, match="a run id is letters"):
        close_run(config, "x' or tags.a = 'b", "FAILED")


def test_an_unreachable_server_is_one_transient_line(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"uri": str(tmp_path / "d.tsv")},
        registry={"tracking_uri": "http://127.0.0.1:9", "http_retries": 0, "http_timeout": 2},
    )
    with pytest.raises(RegistryError) as raised:
        open_run(config, "r", "p")
    assert "is unreachable" in str(raised.value)
    assert raised.value.transient
    assert "\n" not in str(raised.value)


def test_a_steps_error_is_one_line_as_the_runner_reports_it() -> None:
    assert one_line(RegistryError("MLflow at x is unreachable")) == "MLflow at x is unreachable"
    assert one_line(ValueError("bad value\nsecond line")) == "ValueError: bad value"
    assert one_line(KeyError("label")) == "KeyError: 'label'"
    assert one_line(OSError()) == "OSError"
    assert one_line(json.JSONDecodeError("Expecting value", "x", 0)).startswith(
        "json.decoder.JSONDecodeError: Expecting value"
    )


def test_the_failure_hook_is_installed_in_a_pod_only_and_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = sys.excepthook
    monkeypatch.setattr(sys, "excepthook", original)
    for name in (PIPELINE_RUN_ENV, TRACKING_URI_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    assert report_failures() is False  # a local run: its runner records failures
    monkeypatch.setenv(TRACKING_URI_ENV, "http://127.0.0.1:9")
    assert report_failures() is False  # no pipeline run id: not a KFP pod
    assert sys.excepthook is original
    monkeypatch.setenv(PIPELINE_RUN_ENV, "5b2c")
    assert report_failures() is True
    hook = sys.excepthook
    assert hook is not original
    assert report_failures() is True  # configure_logging called again: one hook still
    assert sys.excepthook is hook
