"""One MLflow run per pipeline run, from the first step (transferkit.tracking), through
`transferkit run` on real SST-2 rows and MiniLM: params and system tags from the start, the
datasets with their digests, the training curves under the logged model's metrics, the steps'
timings; a failed run ends FAILED with the failed step's one-line error; a sweep's branches
are children of the pipeline's run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from transferkit import __version__

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def transferkit_run(
    tmp_path: Path, sst2_small: dict[str, Path], config: str, *overrides: str
) -> tuple[subprocess.CompletedProcess[str], MlflowClient]:
    """`transferkit run CONFIG` on the small SST-2 subset, in tmp_path/work."""
    script = Path(sys.executable).with_name("transferkit")
    args = [str(script), "run", config, "--summary", str(tmp_path / "summary.json")]
    for override in (
        f"data.train_uri={sst2_small['train']}",
        f"data.test_uri={sst2_small['test']}",
        "data.max_rows=400",
        f"runtime.work_dir={tmp_path / 'work'}",
        *overrides,
    ):
        args += ["--set", override]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    return done, MlflowClient(tracking_uri=uri, registry_uri=uri)


def pipeline_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`transferkit.run_role` = 'pipeline'")


def test_the_pipeline_run_is_one_mlflow_run_with_params_datasets_curves_and_timings(
    tmp_path: Path, sst2_small: dict[str, Path]
) -> None:
    done, client = transferkit_run(
        tmp_path,
        sst2_small,
        "examples/sst2-finetune.yaml",
        "training.epochs=1",
        "training.max_steps=6",
        "training.eval_every_steps=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    [run] = pipeline_runs(client)
    assert run.info.status == "FINISHED"
    # The registered version is the pipeline's run: no second run was opened at registration.
    version = client.get_model_version("sst2-sentiment", summary["version"])
    assert version.run_id == run.info.run_id
    tags = run.data.tags
    assert tags["transferkit.version"] == __version__
    assert tags["mlflow.source.name"] == "transferkit-transfer-learning"
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.user"]
    assert tags["transferkit.local_run"] in summary["log_file"]
    assert tags["transferkit.pipeline_run_id"]
    # The flattened config, from the first step.
    assert run.data.params["training.max_steps"] == "6"
    assert run.data.params["strategy.name"] == "full_finetune"
    # Each split as a dataset input with the digest of its rows; train linked to the model.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {f"sst2-sentiment-{s}" for s in ("train", "validation", "test")}
    assert len({d.dataset.digest for d in inputs.values()}) == 3
    contexts = {
        name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()
    }
    assert contexts["sst2-sentiment-train"] == "training"
    # The curves, one point per validation (steps 0, 2, 4, 6), under the model's metrics.
    [model] = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    curve = sorted(
        (m.step, m.value) for m in model.metrics or [] if m.key == "curve/validation_accuracy"
    )
    assert [step for step, _ in curve] == [0, 2, 4, 6]
    losses = [m for m in model.metrics or [] if m.key == "curve/train_loss"]
    assert sorted(m.step for m in losses) == [2, 4, 6]
    assert all(m.value > 0 for m in losses)
    # The steps' timings, as the steps recorded them.
    for step in ("ingest_data", "fetch_backbone", "train", "evaluate"):
        assert run.data.metrics[f"step_seconds/{step}"] > 0


def test_a_failed_run_ends_failed_with_the_steps_one_line_error(
    tmp_path: Path, sst2_small: dict[str, Path]
) -> None:
    done, client = transferkit_run(
        tmp_path, sst2_small, "examples/sst2-quickstart.yaml", "data.text_column=review"
    )
    assert done.returncode != 0
    [line] = [line for line in done.stderr.splitlines() if "failed:" in line]
    [run] = pipeline_runs(client)
    assert run.info.status == "FAILED"
    assert run.data.tags["transferkit.failed_step"] == "ingest_data"
    error = run.data.tags["transferkit.error"]
    assert error.startswith("ingest_data failed: ")
    assert error in line  # the same words the terminal showed
    assert "review" in error
    # The params were logged before anything failed; nothing was registered.
    assert run.data.params["data.text_column"] == "review"
    assert client.search_registered_models() == []
