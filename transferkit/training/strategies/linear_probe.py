"""linear_probe: the backbone stays frozen; a logistic-regression head is fitted on the cached
features from extract_features, its L2 penalty chosen on validation (task: regression: a
ridge regression, its penalty chosen the same way)."""

from __future__ import annotations

from transferkit.config import LinearProbeConfig, PipelineConfig
from transferkit.data import load_labels
from transferkit.features import load_features
from transferkit.training.context import Context, Fitted, fit_linear_probe
from transferkit.training.ridge import fit_ridge
from transferkit.training.strategies import register


@register("linear_probe")
def fit(config: PipelineConfig, strategy: LinearProbeConfig, ctx: Context) -> Fitted:
    if config.task == "regression":
        head, ridge = fit_ridge(
            load_features(ctx.features_dir, "train"),
            load_labels(ctx.dataset_dir, "train"),
            load_features(ctx.features_dir, "validation"),
            load_labels(ctx.dataset_dir, "validation"),
            strategy.ridge_alphas,
            config.evaluation.primary_metric,
            overwrite=True,  # both matrices were loaded for this fit alone
        )
        return Fitted(head, ridge.validation_metric, ctx.head_parameters, ridge.model_dump())
    head, probe = fit_linear_probe(config, strategy, ctx)
    return Fitted(head, probe.validation_metric, ctx.head_parameters, probe.model_dump())
