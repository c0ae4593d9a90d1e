"""The transfer-learning DAG: wiring only.

    ingest_data ─ fetch_backbone ─ extract_features ─ train ─ evaluate ─ register_model

fetch_backbone reads the dataset only when it ranks candidate backbones (backbone_selection).

Caching, retries, resources and credentials are set here; the logic lives in the components'
core functions. The same pipeline object runs under KFP's local runner (``transferkit run``)
and compiles to the IR YAML a cluster runs (``transferkit compile``).
"""

from typing import Any

from kfp import dsl
from transferkit.pipelines import PIPELINE_NAME
from transferkit.pipelines.wiring import Cluster, prepare, register, train_and_evaluate

from transferkit.config import PipelineConfig


def build(config: PipelineConfig | None = None) -> Any:
    """The pipeline with the pods' resources, placement and Secrets of ``config``.

    Kubernetes settings are fixed when a pipeline compiles, so they come from the config the
    pipeline is built with; the run parameter ``config`` carries everything else. Unset: the
    default resources and no Secrets.
    """
    cluster = Cluster(config)

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
        config: a transferkit.config.PipelineConfig as a dict (``transferkit validate`` checks
            it).
        data_stamp: content stamp of the data sources (computed by ``transferkit run``/
            ``submit``); it keys the ingest cache, so changed bytes behind an unchanged URI are
            re-read.
        backbone_stamp: content stamp of the backbone source, likewise for fetch_backbone.
        """
        dataset, backbone, features = prepare(config, data_stamp, backbone_stamp, cluster)
        fit, scored = train_and_evaluate(config, dataset, backbone, features, cluster)
        return register(
            config, dataset, backbone, fit.outputs["model"], scored.outputs["evaluation"], cluster
        )

    return transfer_learning


transfer_learning = build()
