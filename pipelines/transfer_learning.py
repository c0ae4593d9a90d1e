"""The transfer-learning DAG: wiring only.

    ingest_data ─┐
                 ├─ extract_features ─ train ─ evaluate ─ register_model
    fetch_backbone┘

Caching, retries and resources are set here; the logic lives in the components' core
functions. The same pipeline object runs under KFP's local runner (``transferkit run``) and
compiles to the IR YAML a cluster runs (``transferkit compile``).
"""

from kfp import dsl, kubernetes
from transferkit.components import (
    evaluate,
    extract_features,
    fetch_backbone,
    ingest_data,
    register_model,
    train,
)

PIPELINE_NAME = "transferkit-transfer-learning"


def _step(
    task: dsl.PipelineTask,
    step: str,
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
    kubernetes.add_pod_label(task, "transferkit.dev/step", step)
    return task


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Ingest a labelled dataset, fetch a pre-trained backbone, extract features, "
    "train with a transfer strategy, evaluate, and register the model in MLflow.",
)
def transfer_learning(
    config: dict,
    data_stamp: str = "",
    backbone_stamp: str = "",
) -> dsl.Artifact:
    """Args:
    config: a transferkit.config.PipelineConfig as a dict (``transferkit validate`` checks it).
    data_stamp: content stamp of the data sources (computed by ``transferkit run``/``submit``);
        it keys the ingest cache, so changed bytes behind an unchanged URI are re-read.
    backbone_stamp: content stamp of the backbone source, likewise for fetch_backbone.
    """
    ingest = _step(
        ingest_data(config=config, source_stamp=data_stamp),
        "ingest_data",
        cache=True,
        io_retries=True,
    )
    fetch = _step(
        fetch_backbone(config=config, source_stamp=backbone_stamp),
        "fetch_backbone",
        cache=True,
        io_retries=True,
    )
    dataset, backbone = ingest.outputs["dataset"], fetch.outputs["backbone"]
    extract = _step(
        extract_features(config=config, dataset=dataset, backbone=backbone),
        "extract_features",
        cache=True,
    )
    fit = _step(
        train(
            config=config, dataset=dataset, backbone=backbone, features=extract.outputs["features"]
        ),
        "train",
        cache=True,
    )
    scored = _step(
        evaluate(config=config, dataset=dataset, model=fit.outputs["model"]), "evaluate", cache=True
    )
    # Registration has side effects in MLflow: it always runs, and is idempotent by content.
    register = _step(
        register_model(
            config=config,
            dataset=dataset,
            backbone=backbone,
            model=fit.outputs["model"],
            evaluation=scored.outputs["evaluation"],
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "register_model",
        cache=False,
        io_retries=True,
    )
    return register.outputs["registration"]
