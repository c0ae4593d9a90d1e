"""register_model against a real MLflow store (SQLite): versions, aliases, failure safety."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.errors import RegistryError
from transferkit.evaluation import evaluate
from transferkit.registry import redact, register_model


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, probe_run: tuple) -> tuple:
    config, artifacts, _ = probe_run
    out = tmp_path_factory.mktemp("eval") / "evaluation"
    evaluate(config, artifacts / "dataset", artifacts / "model", out)
    return config, artifacts, out


def with_store(config: PipelineConfig, tmp_path: Path) -> PipelineConfig:
    data = config.model_dump()
    data["runtime"]["work_dir"] = str(tmp_path)
    data["registry"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return PipelineConfig.model_validate(data)


def register(
    config: PipelineConfig,
    artifacts: Path,
    evaluation: Path,
    out: Path,
    run_id: str = "run-1",
    model: Path | None = None,
):
    return register_model(
        config,
        artifacts / "dataset",
        artifacts / "backbone",
        model or artifacts / "model",
        evaluation,
        run_id,
        out,
    )


def shifted_evaluation(evaluation: Path, target: Path, delta: float) -> Path:
    """A copy of an evaluation whose accuracy is moved by ``delta`` (a better/worse rival)."""
    shutil.copytree(evaluation, target)
    payload = storage.read_json(target / "evaluation.json")
    payload["scores"]["accuracy"] += delta
    payload["primary_value"] = payload["scores"]["accuracy"]
    storage.write_json(target / "evaluation.json", payload)
    return target


def other_model(model: Path, target: Path) -> Path:
    """Same weights, a different training report: different bytes, hence a new version."""
    shutil.copytree(model, target)
    report = storage.read_json(target / "training.json")
    report["details"]["copy"] = target.name
    storage.write_json(target / "training.json", report)
    return target


def register_rival(
    config: PipelineConfig,
    artifacts: Path,
    evaluation: Path,
    tmp_path: Path,
    name: str,
    delta: float,
):
    """Register a different model whose accuracy differs from the original by ``delta``."""
    return register(
        config,
        artifacts,
        shifted_evaluation(evaluation, tmp_path / f"e-{name}", delta),
        tmp_path / f"r-{name}.json",
        model=other_model(artifacts / "model", tmp_path / f"m-{name}"),
    )


def test_registers_logs_and_serves(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    result = register(config, artifacts, evaluation, tmp_path / "registration.json")
    assert (result.version, result.champion, result.reused) == ("1", True, False)
    assert result.reason == "no champion yet"
    assert result.model_uri == "models:/sst2-test/1"
    assert storage.read_json(tmp_path / "registration.json")["model_uri"] == result.model_uri

    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    version = client.get_model_version_by_alias("sst2-test", "champion")
    assert str(version.version) == "1"
    assert str(client.get_model_version_by_alias("sst2-test", "challenger").version) == "1"
    assert version.tags["transferkit.strategy"] == "linear_probe"
    assert version.tags["transferkit.pipeline_run_id"] == "run-1"
    assert len(version.tags["transferkit.data_fingerprint"]) == 64
    run = client.get_run(result.run_id)
    assert run.data.params["strategy.name"] == "linear_probe"
    assert run.data.params["data.text_column"] == "sentence"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    artifacts_logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"evaluation", "data", "config.yaml"} <= artifacts_logged
    logged = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/confusion_matrix.png"} <= logged

    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)  # the registry URI is a separate global
    model = mlflow.pyfunc.load_model("models:/sst2-test@champion")
    assert model.metadata.signature.inputs.input_names() == ["text"]
    predictions = model.predict(
        pd.DataFrame({"text": ["a wonderful, moving film", "a dull, lifeless mess"]})
    )
    assert predictions["label"].tolist() == ["positive", "negative"]
    assert list(predictions.columns) == ["label", "score", "p_negative", "p_positive"]
    assert ((predictions["score"] > 0.5) & (predictions["score"] <= 1)).all()


def test_identical_model_reuses_its_version(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    first = register(config, artifacts, evaluation, tmp_path / "r1.json")
    again = register(config, artifacts, evaluation, tmp_path / "r2.json", run_id="run-2")
    assert again.reused
    assert again.version == first.version == "1"
    assert again.champion
    assert again.reason == "already the champion"
    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    assert len(client.search_model_versions("name = 'sst2-test'")) == 1


def test_champion_moves_only_to_a_better_model(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    register(config, artifacts, evaluation, tmp_path / "r1.json")
    worse = register_rival(config, artifacts, evaluation, tmp_path, "worse", -0.05)
    assert (worse.version, worse.champion, worse.previous_champion) == ("2", False, "1")
    assert "gain -0.0500" in worse.reason
    better = register_rival(config, artifacts, evaluation, tmp_path, "better", 0.02)
    assert (better.version, better.champion) == ("3", True)
    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    assert str(client.get_model_version_by_alias("sst2-test", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("sst2-test", "challenger").version) == "3"


def test_min_improvement_and_promote_switch(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    register(config, artifacts, evaluation, tmp_path / "r1.json")
    strict = config.model_copy(deep=True)
    strict.registry.min_improvement = 0.05
    small_gain = register_rival(strict, artifacts, evaluation, tmp_path, "small", 0.01)
    assert not small_gain.champion
    assert "needs > 0.05" in small_gain.reason
    frozen = config.model_copy(deep=True)
    frozen.registry.promote = False
    no_promote = register_rival(frozen, artifacts, evaluation, tmp_path, "frozen", 0.1)
    assert not no_promote.champion
    assert no_promote.reason.endswith("registry.promote is off")


def test_failure_mid_registration_leaves_no_version(tmp_path: Path, evaluated: tuple) -> None:
    """The report artifact vanished after evaluation: nothing may stay registered."""
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    broken = tmp_path / "broken-eval"
    shutil.copytree(evaluation, broken)
    (broken / "confusion_matrix.png").unlink()
    with pytest.raises(FileNotFoundError):
        register(config, artifacts, broken, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    assert client.search_model_versions("name = 'sst2-test'") == []
    runs = client.search_runs([client.get_experiment_by_name("transferkit").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_unreachable_server_is_a_one_line_registry_error(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    data = config.model_dump()
    data["registry"]["tracking_uri"] = "http://user:secret@127.0.0.1:9"
    config = PipelineConfig.model_validate(data)
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with pytest.raises(RegistryError) as info:
            register(config, artifacts, evaluation, tmp_path / "r.json")
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    message = str(info.value)
    assert "secret" not in message
    assert message.startswith("MLflow at http://127.0.0.1:9 is unreachable")
    assert "\n" not in message
    assert not (tmp_path / "r.json").exists()


def test_redact() -> None:
    assert redact("https://u:p@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert redact("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
