"""linear_probe: the backbone stays frozen; a logistic-regression head is fitted on the cached
features from extract_features, its L2 penalty chosen on validation (task: regression: a
ridge regression, its penalty chosen the same way)."""

from __future__ import annotations

from transferkit.config import LinearProbeConfig, PipelineConfig
from transferkit.training.context import Context, Fitted, fit_linear_probe
from transferkit.training.strategies import register


@register("linear_probe")
def fit(config: PipelineConfig, strategy: LinearProbeConfig, ctx: Context) -> Fitted:
    head, probe = fit_linear_probe(config, strategy, ctx)
    return Fitted(head, probe.validation_metric, ctx.head_parameters, probe.model_dump())
