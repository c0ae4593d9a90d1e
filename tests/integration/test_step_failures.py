"""A step that fails in its pod on a cluster records its own one-line error on the pipeline
run's MLflow run (transferkit.tracking.report_failures), against a real ``mlflow server``.

There is no cluster here: the step runs as its pod runs it — a fresh Python process, the
component's function called and its error left uncaught — with the environment the compiled
pipeline gives every pod (tests/pipelines/test_cluster_compile.py checks that wiring): the
KFP run id and the step from the pod's labels, the tracking server without credentials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SHARED_DATA
from tests.integration.conftest import MlflowServer
from transferkit import tracking
from transferkit.config import PipelineConfig
from transferkit.step_inputs import step_arguments

pytestmark = pytest.mark.integration

DATA = SHARED_DATA / "sst2"

STEP = """
import json, sys
from kfp import dsl
from transferkit.components import ingest_data
config = json.loads(sys.argv[1])
ingest_data.python_func(
    config=config, source_stamp="s", dataset=dsl.Dataset(name="dataset", uri=sys.argv[2])
)
"""


def pod_environment(server: MlflowServer, run_id: str, step: str) -> dict[str, str]:
    return {
        **os.environ,
        tracking.PIPELINE_RUN_ENV: run_id,
        tracking.STEP_ENV: step,
        tracking.TRACKING_URI_ENV: server.url,
        tracking.EXPERIMENT_ENV: "step-failures",
    }


def pipeline_run(client: MlflowClient, run_id: str) -> Any:
    experiment = client.get_experiment_by_name("step-failures")
    (run,) = client.search_runs(
        [experiment.experiment_id], f"tags.`{tracking.RUN_ID_TAG}` = '{run_id}'"
    )
    return run


def test_a_step_failing_in_its_pod_puts_its_own_error_on_the_pipeline_run(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    config = PipelineConfig.model_validate(
        {
            "data": {
                "train_uri": str(DATA / "train.tsv"),
                "test_uri": str(DATA / "dev.tsv"),
                "text_column": "review",  # SST-2's column is 'sentence'
                "label_column": "label",
            },
            "registry": {"tracking_uri": mlflow_server.url, "experiment": "step-failures"},
            "runtime": {"work_dir": str(tmp_path / "work")},
        }
    )
    run_id = str(uuid.uuid4())  # KFP's run id: the pod label pipeline/runid
    tracking.open_run(config, run_id, "transferkit-transfer-learning")
    out = tmp_path / "dataset"
    step = subprocess.run(
        [sys.executable, "-c", STEP, json.dumps(step_arguments(config)["ingest_data_config"]),
         str(out)],
        env=pod_environment(mlflow_server, run_id, "ingest_data"),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert step.returncode == 1, step.stderr[-3000:]
    # The traceback is printed as before, then the failure is recorded.
    lines = step.stderr.strip().splitlines()
    error = next(line for line in reversed(lines) if line.startswith("transferkit.errors."))
    assert error.startswith("transferkit.errors.DataError: "), step.stderr[-3000:]
    assert lines[-1].endswith("FAILED")  # "marked MLflow run … FAILED"
    assert "review" in error
    assert "could not record" not in step.stderr
    assert not out.exists()  # nothing half-written

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = pipeline_run(client, run_id)
    assert run.info.status == "FAILED"
    message = error.removeprefix("transferkit.errors.DataError: ")
    assert run.data.tags[tracking.ERROR_TAG] == f"ingest_data failed: {message}"
    assert run.data.tags[tracking.FAILED_STEP_TAG] == "ingest_data"

    # The exit task then closes it with KFP's final status, which names no cause: the step's
    # own error stays.
    state = tracking.close_run(config, run_id, "FAILED", "Task ingest-data failed", "close_run")
    assert state == "FAILED"
    run = pipeline_run(client, run_id)
    assert run.data.tags[tracking.ERROR_TAG] == f"ingest_data failed: {message}"
    assert run.data.tags[tracking.FAILED_STEP_TAG] == "ingest_data"


def test_a_failure_with_mlflow_unreachable_is_still_the_steps_own_error(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """The pod's MLflow is down: the step still fails with its own error and exit status,
    and says in one line that the failure could not be recorded."""
    config = {"data": {"train_uri": str(tmp_path / "missing.tsv"), "text_column": "sentence"}}
    environment = pod_environment(mlflow_server, str(uuid.uuid4()), "ingest_data")
    environment[tracking.TRACKING_URI_ENV] = "http://127.0.0.1:9"  # nothing listens there
    step = subprocess.run(
        [sys.executable, "-c", STEP, json.dumps(config), str(tmp_path / "dataset")],
        env=environment, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert step.returncode == 1
    lines = step.stderr.strip().splitlines()
    assert any(line.startswith("transferkit.errors.") for line in lines), step.stderr[-3000:]
    assert "missing.tsv" in next(line for line in lines if line.startswith("transferkit.errors."))
    warning = [line for line in lines if "could not record the failure" in line]
    assert len(warning) == 1, lines[-5:]
    assert "unreachable" in warning[0]
