"""Wiring shared by the pipelines: per-step options and the common ingest → extract prefix."""

from typing import Any

from kfp import dsl, kubernetes
from transferkit.components import extract_features, fetch_backbone, ingest_data, register_model


def step(
    task: dsl.PipelineTask,
    name: str,
    cache: bool,
    io_retries: bool = False,
) -> dsl.PipelineTask:
    """Caching, retries and pod labels of one step.

    Steps that talk to object storage or MLflow retry transient failures with backoff; pod
    labels let cluster tooling (cost reports, policies, log search) find transferkit pods.
    """
    task.set_caching_options(enable_caching=cache)
    if io_retries:
        task.set_retry(
            num_retries=2, backoff_duration="5s", backoff_factor=2.0, backoff_max_duration="60s"
        )
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "transferkit")
    kubernetes.add_pod_label(task, "transferkit.dev/step", name)
    return task


def prepare(config: dict, data_stamp: str, backbone_stamp: str) -> tuple[Any, Any, Any]:
    """ingest_data, fetch_backbone (which may rank candidate backbones on the data), then
    extract_features.

    Returns:
        The dataset, backbone and features artifacts.
    """
    ingest = step(
        ingest_data(config=config, source_stamp=data_stamp),
        "ingest_data",
        cache=True,
        io_retries=True,
    )
    fetch = step(
        fetch_backbone(
            config=config, source_stamp=backbone_stamp, dataset=ingest.outputs["dataset"]
        ),
        "fetch_backbone",
        cache=True,
        io_retries=True,
    )
    dataset, backbone = ingest.outputs["dataset"], fetch.outputs["backbone"]
    extract = step(
        extract_features(config=config, dataset=dataset, backbone=backbone),
        "extract_features",
        cache=True,
    )
    return dataset, backbone, extract.outputs["features"]


def register(config: Any, dataset: Any, backbone: Any, model: Any, evaluation: Any) -> Any:
    """register_model: it has side effects in MLflow, so it always runs (idempotent by
    content) and retries transient failures.

    Returns:
        The registration artifact.
    """
    task = step(
        register_model(
            config=config,
            dataset=dataset,
            backbone=backbone,
            model=model,
            evaluation=evaluation,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "register_model",
        cache=False,
        io_retries=True,
    )
    return task.outputs["registration"]
