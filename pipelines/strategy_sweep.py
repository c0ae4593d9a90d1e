"""The strategy-sweep DAG: every strategy and label budget of a sweep config as parallel
branches on the same splits, compared in one report. Wiring only.

    ingest_data ─ fetch_backbone ─ extract_features ─ plan_sweep ┬ train ─ evaluate ┐
                                                                 │       …          │
                                                                 └ train ─ evaluate ┤
                                     (one branch per strategy × budget)              │
                                                 register_model ─ compare_strategies ┘

compare_strategies selects one branch (validation metric and cost) and flags negative
transfer against scratch; register_model logs a parent MLflow run with one child per branch
and registers the selected model.
"""

from typing import Any

from kfp import dsl
from transferkit.components import (
    compare_strategies,
    evaluate,
    plan_sweep,
    train,
)
from transferkit.pipelines.wiring import prepare, register, step

SWEEP_PIPELINE_NAME = "transferkit-strategy-sweep"


def build(parallelism: int = 1) -> Any:
    """The sweep pipeline with at most ``parallelism`` branches running at once.

    KFP fixes a ParallelFor's parallelism when the pipeline compiles, so it is a build
    argument (``sweep.parallelism``, applied by ``transferkit compile``), not a run parameter.
    """

    @dsl.pipeline(
        name=SWEEP_PIPELINE_NAME,
        description="Train and evaluate several transfer strategies and label budgets on the "
        "same splits, compare them against a from-scratch baseline, and register the selected "
        "model.",
    )
    def strategy_sweep(
        config: dict,
        data_stamp: str = "",
        backbone_stamp: str = "",
    ) -> dsl.Artifact:
        """Args:
        config: a transferkit.config.PipelineConfig with a 'sweep' section, as a dict.
        data_stamp: content stamp of the data sources (keys the ingest cache).
        backbone_stamp: content stamp of the backbone source (keys the fetch cache).
        """
        dataset, backbone, features = prepare(config, data_stamp, backbone_stamp)
        planned = step(plan_sweep(config=config), "plan_sweep", cache=True)
        with dsl.ParallelFor(planned.output, parallelism=parallelism) as branch_config:
            fit = step(
                train(config=branch_config, dataset=dataset, backbone=backbone, features=features),
                "train",
                cache=True,
            )
            scored = step(
                evaluate(config=branch_config, dataset=dataset, model=fit.outputs["model"]),
                "evaluate",
                cache=True,
            )
        compared = step(
            compare_strategies(
                config=config,
                models=dsl.Collected(fit.outputs["model"]),
                evaluations=dsl.Collected(scored.outputs["evaluation"]),
            ),
            "compare_strategies",
            cache=True,
        )
        return register(
            compared.outputs["Output"],
            dataset,
            backbone,
            compared.outputs["model"],
            compared.outputs["evaluation"],
        )

    return strategy_sweep


strategy_sweep = build()
