"""The transfer-learning DAG: wiring only.

    ingest_data ─┐
                 ├─ extract_features ─ train ─ evaluate ─ register_model
    fetch_backbone┘

Caching, retries and resources are set here; the logic lives in the components' core
functions. The same pipeline object runs under KFP's local runner (``transferkit run``) and
compiles to the IR YAML a cluster runs (``transferkit compile``).
"""

from kfp import dsl
from transferkit.components import (
    evaluate,
    extract_features,
    fetch_backbone,
    ingest_data,
    register_model,
    train,
)

PIPELINE_NAME = "transferkit-transfer-learning"


def _retry_io(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Steps that talk to object storage or MLflow retry transient failures with backoff."""
    return task.set_retry(
        num_retries=2, backoff_duration="5s", backoff_factor=2.0, backoff_max_duration="60s"
    )


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Ingest a labelled dataset, fetch a pre-trained backbone, extract features, "
    "train with a transfer strategy, evaluate, and register the model in MLflow.",
)
def transfer_learning(config: dict, data_stamp: str = "", backbone_stamp: str = "") -> dsl.Artifact:
    """Args:
    config: a transferkit.config.PipelineConfig as a dict (``transferkit validate`` checks it).
    data_stamp: content stamp of the data sources (computed by ``transferkit run``/``submit``);
        it keys the ingest cache, so changed bytes behind an unchanged URI are re-read.
    backbone_stamp: content stamp of the backbone source, likewise for fetch_backbone.
    """
    ingest = _retry_io(ingest_data(config=config, source_stamp=data_stamp))
    fetch = _retry_io(fetch_backbone(config=config, source_stamp=backbone_stamp))
    ingest.set_caching_options(enable_caching=True)
    fetch.set_caching_options(enable_caching=True)

    extract = extract_features(
        config=config, dataset=ingest.outputs["dataset"], backbone=fetch.outputs["backbone"]
    )
    extract.set_caching_options(enable_caching=True)

    fit = train(
        config=config,
        dataset=ingest.outputs["dataset"],
        backbone=fetch.outputs["backbone"],
        features=extract.outputs["features"],
    )
    fit.set_caching_options(enable_caching=True)

    scored = evaluate(config=config, dataset=ingest.outputs["dataset"], model=fit.outputs["model"])
    scored.set_caching_options(enable_caching=True)

    # Registration has side effects in MLflow: it always runs (idempotent by model content).
    register = _retry_io(
        register_model(
            config=config,
            dataset=ingest.outputs["dataset"],
            backbone=fetch.outputs["backbone"],
            model=fit.outputs["model"],
            evaluation=scored.outputs["evaluation"],
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
    )
    register.set_caching_options(enable_caching=False)
    return register.outputs["registration"]
