"""Each KFP component, executed alone by KFP's local runner (a subprocess per component)."""

import json
from pathlib import Path
from typing import NamedTuple

import mlflow
import pandas as pd
import pytest
from kfp import dsl, local
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model
from transferkit.components import (
    evaluate,
    extract_features,
    fetch_backbone,
    ingest_data,
    register_model,
    train,
)

from tests.conftest import make_config
from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.step_inputs import step_slice


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, sst2_small: dict[str, Path]) -> PipelineConfig:
    root = tmp_path_factory.mktemp("components")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root / "pipeline-root"),
        raise_on_error=True,
    )
    return make_config(
        root,
        {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "max_rows": 600,
            "label_names": {"0": "negative", "1": "positive"},
        },
        registry={"model_name": "component-test"},
    )


@pytest.fixture(scope="module")
def ingested(config: PipelineConfig):
    return ingest_data(config=step_slice(config, "ingest_data"), source_stamp="stamp-1")


# KFP's local runner cannot hand artifacts to a lone component call, so each downstream
# component runs in a one-step pipeline whose inputs are dsl.importer nodes pointing at the
# artifacts the previous component wrote.


def imported(path: str, kind: type) -> dsl.PipelineTask:
    return dsl.importer(artifact_uri=path, artifact_class=kind, reimport=True)


@pytest.fixture(scope="module")
def fetched(config: PipelineConfig, ingested):
    @dsl.pipeline(name="fetch-only")
    def one_step(config: dict, dataset: str) -> Model:
        return fetch_backbone(
            config=config, source_stamp="stamp-2", dataset=imported(dataset, Dataset).output
        ).outputs["backbone"]

    return one_step(
        config=step_slice(config, "fetch_backbone"), dataset=ingested.outputs["dataset"].path
    )


@pytest.fixture(scope="module")
def extracted(config: PipelineConfig, ingested, fetched):
    @dsl.pipeline(name="extract-only")
    def one_step(config: dict, dataset: str, backbone: str) -> Dataset:
        return extract_features(
            config=config,
            dataset=imported(dataset, Dataset).output,
            backbone=imported(backbone, Model).output,
        ).outputs["features"]

    return one_step(
        config=step_slice(config, "extract_features"),
        dataset=ingested.outputs["dataset"].path,
        backbone=fetched.output.path,
    ).output


@pytest.fixture(scope="module")
def trained(config: PipelineConfig, ingested, fetched, extracted):
    @dsl.pipeline(name="train-only")
    def one_step(config: dict, dataset: str, backbone: str, features: str) -> Model:
        return train(
            config=config,
            dataset=imported(dataset, Dataset).output,
            backbone=imported(backbone, Model).output,
            features=imported(features, Dataset).output,
        ).outputs["model"]

    return one_step(
        config=step_slice(config, "train"),
        dataset=ingested.outputs["dataset"].path,
        backbone=fetched.output.path,
        features=extracted.path,
    ).output


class Scored(NamedTuple):
    evaluation: Artifact
    metrics: Metrics
    classification_metrics: ClassificationMetrics
    report: Markdown


@pytest.fixture(scope="module")
def evaluated(config: PipelineConfig, ingested, trained):
    @dsl.pipeline(name="evaluate-only")
    def one_step(config: dict, dataset: str, model: str) -> Scored:
        task = evaluate(
            config=config,
            dataset=imported(dataset, Dataset).output,
            model=imported(model, Model).output,
        )
        return Scored(
            task.outputs["evaluation"],
            task.outputs["metrics"],
            task.outputs["classification_metrics"],
            task.outputs["report"],
        )

    return one_step(
        config=step_slice(config, "evaluate"),
        dataset=ingested.outputs["dataset"].path,
        model=trained.path,
    ).outputs


def test_ingest_data(ingested) -> None:
    dataset = ingested.outputs["dataset"]
    assert dataset.metadata["rows"] == {"train": 540, "validation": 60, "test": 300}
    assert dataset.metadata["labels"] == ["negative", "positive"]
    assert dataset.metadata["source_stamp"] == "stamp-1"
    stats = storage.read_json(Path(dataset.path) / "stats.json")
    assert stats["fingerprint"] == dataset.metadata["fingerprint"]


def test_fetch_backbone(fetched) -> None:
    backbone = fetched.output
    assert backbone.metadata["architecture"] == "BertModel"
    assert backbone.metadata["parameters"] == 22_713_216
    assert (Path(backbone.path) / "model" / "model.safetensors").is_file()


def test_extract_features(extracted) -> None:
    features = extracted
    assert features.metadata["dim"] == 384
    assert features.metadata["rows"] == {"train": 540, "validation": 60, "test": 300}
    assert not features.metadata["cache_hit"]


def test_train(trained) -> None:
    model = trained
    assert model.metadata["strategy"] == "linear_probe"
    assert model.metadata["trainable_parameters"] == 770
    assert model.metadata["validation_metric"] > 0.7
    assert (Path(model.path) / "transferkit.json").is_file()


def test_evaluate(evaluated) -> None:
    metrics = evaluated["metrics"].metadata
    assert metrics["accuracy"] > 0.7
    assert set(metrics) >= {"accuracy", "macro_f1", "f1_negative", "f1_positive"}
    confusion = evaluated["classification_metrics"].metadata["confusionMatrix"]
    assert [c["displayName"] for c in confusion["annotationSpecs"]] == ["negative", "positive"]
    assert sum(sum(row["row"]) for row in confusion["rows"]) == 300
    report = Path(evaluated["report"].path).read_text()
    assert report.startswith("# Evaluation — linear_probe")


def test_register_model(config: PipelineConfig, ingested, fetched, trained, evaluated) -> None:
    @dsl.pipeline(name="register-only")
    def one_step(
        config: dict, dataset: str, backbone: str, model: str, evaluation: str
    ) -> Artifact:
        return register_model(
            config=config,
            dataset=imported(dataset, Dataset).output,
            backbone=imported(backbone, Model).output,
            model=imported(model, Model).output,
            evaluation=imported(evaluation, Artifact).output,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            mlflow_run_id="",  # no open_run step before it: registration opens its own run
        ).outputs["registration"]

    registration = one_step(
        config=step_slice(config, "register_model"),
        dataset=ingested.outputs["dataset"].path,
        backbone=fetched.output.path,
        model=trained.path,
        evaluation=evaluated["evaluation"].path,
    ).output
    result = json.loads(Path(registration.path).read_text())
    assert registration.metadata == {
        "model_uri": "models:/component-test/1",
        "champion": True,
        "version": "1",
    }
    assert result["metrics"]["test_accuracy"] == pytest.approx(
        evaluated["metrics"].metadata["accuracy"]
    )
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)  # the registry URI is a separate global
    model = mlflow.pyfunc.load_model("models:/component-test@champion")
    version = mlflow.MlflowClient().get_model_version("component-test", "1")
    # The local runner resolves PIPELINE_JOB_ID_PLACEHOLDER to its own run id.
    run_id = version.tags["transferkit.pipeline_run_id"]
    assert run_id
    assert "{{" not in run_id
    assert model.predict(pd.DataFrame({"text": ["an utterly delightful film"]}))[
        "label"
    ].tolist() == ["positive"]
