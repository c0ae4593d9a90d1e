"""The transfer-learning DAG: wiring only.

    open_run ─ ingest_data ─ fetch_backbone ─ extract_features ─ train ─ evaluate ─ register_model
    (close_run: the exit handler's exit step, when the rest succeeded or failed)

open_run and close_run open and close the pipeline run's MLflow run (transferkit.tracking).

fetch_backbone reads the dataset only when it ranks candidate backbones (backbone_selection).

Caching, retries, resources and credentials are set here; the logic lives in the components'
core functions. The same pipeline object runs under KFP's local runner (``transferkit run``)
and compiles to the IR YAML a cluster runs (``transferkit compile``).
"""

from typing import Any

from kfp import dsl
from transferkit.pipelines import PIPELINE_NAME
from transferkit.pipelines.wiring import Cluster, prepare, register, tracked, train_and_evaluate

from transferkit.config import PipelineConfig


def build(config: PipelineConfig | None = None) -> Any:
    """The pipeline with the pods' resources, placement and Secrets of ``config``.

    Kubernetes settings are fixed when a pipeline compiles, so they come from the config the
    pipeline is built with; the run parameters carry everything else, one part per step. Unset: the
    default resources and no Secrets.
    """
    cluster = Cluster(config)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Ingest a labelled dataset, fetch a pre-trained backbone, extract features, "
        "train with a transfer strategy, evaluate, and register the model in MLflow.",
    )
    def transfer_learning(
        ingest_data_config: dict,
        fetch_backbone_config: dict,
        extract_features_config: dict,
        train_config: dict,
        evaluate_config: dict,
        register_model_config: dict,
        data_stamp: str = "",
        backbone_stamp: str = "",
    ) -> None:
        """Args:
        ingest_data_config … register_model_config: each step's part of one
            transferkit.config.PipelineConfig (``transferkit.step_inputs.step_arguments``;
            ``transferkit run``/``submit`` compute them, ``transferkit validate`` checks the
            whole). A step's cache key holds only what it reads, so a change re-runs only the
            steps downstream of it.
        data_stamp: content stamp of the data sources (computed by ``transferkit run``/
            ``submit``); it keys the ingest cache, so changed bytes behind an unchanged URI are
            re-read.
        backbone_stamp: content stamp of the backbone source, likewise for fetch_backbone.
        """
        configs = {
            "ingest_data": ingest_data_config,
            "fetch_backbone": fetch_backbone_config,
            "extract_features": extract_features_config,
            "train": train_config,
            "evaluate": evaluate_config,
        }
        with tracked(register_model_config, "register_model", PIPELINE_NAME, cluster) as opened:
            dataset, backbone, features = prepare(
                configs, data_stamp, backbone_stamp, cluster, opened
            )
            fit, scored = train_and_evaluate(configs, dataset, backbone, features, cluster)
            register(
                register_model_config,
                dataset,
                backbone,
                fit.outputs["model"],
                scored.outputs["evaluation"],
                cluster,
                opened,
            )

    return transfer_learning


transfer_learning = build()
