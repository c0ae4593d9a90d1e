"""The transfer-learning DAG: wiring only.

    ingest_data ─ fetch_backbone ─ extract_features ─ train ─ evaluate ─ register_model

fetch_backbone reads the dataset only when it ranks candidate backbones (backbone_selection).

Caching, retries and resources are set here; the logic lives in the components' core
functions. The same pipeline object runs under KFP's local runner (``transferkit run``) and
compiles to the IR YAML a cluster runs (``transferkit compile``).
"""

from kfp import dsl
from transferkit.components import evaluate, train
from transferkit.pipelines.wiring import prepare, register, step

PIPELINE_NAME = "transferkit-transfer-learning"


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
    dataset, backbone, features = prepare(config, data_stamp, backbone_stamp)
    fit = step(
        train(config=config, dataset=dataset, backbone=backbone, features=features),
        "train",
        cache=True,
    )
    scored = step(
        evaluate(config=config, dataset=dataset, model=fit.outputs["model"]), "evaluate", cache=True
    )
    return register(config, dataset, backbone, fit.outputs["model"], scored.outputs["evaluation"])
