"""The strategy-sweep DAG: every strategy and label budget of a sweep config as parallel
branches on the same splits, compared in one report. Wiring only.

    ingest_data ─ fetch_backbone ─ extract_features ─ plan_sweep ┬ train ─ evaluate ┐
                                                                 │       …          │
                                                                 └ train ─ evaluate ┤
                                     (one branch per strategy × budget)              │
                                                 register_model ─ compare_strategies ┘

compare_strategies selects one branch (validation metric and cost) and flags negative
transfer against scratch; register_model logs one child run per branch under the pipeline
run's MLflow run (which open_run opened first and close_run ends) and registers the selected
model.
"""

from typing import Any

from kfp import dsl
from transferkit.components import compare_strategies, plan_sweep
from transferkit.pipelines import SWEEP_PIPELINE_NAME
from transferkit.pipelines.wiring import (
    Cluster,
    prepare,
    register,
    step,
    tracked,
    train_and_evaluate,
)

from transferkit.config import PipelineConfig


def build(config: PipelineConfig | None = None) -> Any:
    """The sweep pipeline with the sweep's parallelism and the pods' settings of ``config``.

    KFP fixes a ParallelFor's parallelism and the Kubernetes settings when the pipeline
    compiles, so they are build arguments (``sweep.parallelism``, ``resources``,
    ``kubernetes``, applied by ``transferkit compile``), not run parameters.
    """
    parallelism = config.sweep.parallelism if config and config.sweep else 1
    cluster = Cluster(config)

    @dsl.pipeline(
        name=SWEEP_PIPELINE_NAME,
        description="Train and evaluate several transfer strategies and label budgets on the "
        "same splits, compare them against a from-scratch baseline, and register the selected "
        "model.",
    )
    def strategy_sweep(
        ingest_data_config: dict,
        fetch_backbone_config: dict,
        extract_features_config: dict,
        plan_sweep_config: dict,
        compare_strategies_config: dict,
        data_stamp: str = "",
        backbone_stamp: str = "",
    ) -> None:
        """Args:
        ingest_data_config … compare_strategies_config: each step's part of one
            transferkit.config.PipelineConfig with a 'sweep' section
            (``transferkit.step_inputs.step_arguments``); the branches' train and evaluate
            steps get theirs from plan_sweep, registration from compare_strategies.
        data_stamp: content stamp of the data sources (keys the ingest cache).
        backbone_stamp: content stamp of the backbone source (keys the fetch cache).
        """
        configs = {
            "ingest_data": ingest_data_config,
            "fetch_backbone": fetch_backbone_config,
            "extract_features": extract_features_config,
        }
        with tracked(
            compare_strategies_config, "compare_strategies", SWEEP_PIPELINE_NAME, cluster
        ) as opened:
            dataset, backbone, features = prepare(
                configs, data_stamp, backbone_stamp, cluster, opened
            )
            planned = step(
                plan_sweep(config=plan_sweep_config), "plan_sweep", cache=True, cluster=cluster
            )
            with dsl.ParallelFor(planned.output, parallelism=parallelism) as branch:
                fit, scored = train_and_evaluate(
                    {"train": branch.train, "evaluate": branch.evaluate},
                    dataset,
                    backbone,
                    features,
                    cluster,
                )
            compared = step(
                compare_strategies(
                    config=compare_strategies_config,
                    models=dsl.Collected(fit.outputs["model"]),
                    evaluations=dsl.Collected(scored.outputs["evaluation"]),
                ),
                "compare_strategies",
                cache=True,
                cluster=cluster,
            )
            register(
                compared.outputs["Output"],
                dataset,
                backbone,
                compared.outputs["model"],
                compared.outputs["evaluation"],
                cluster,
                opened,
            )

    return strategy_sweep


strategy_sweep = build()
