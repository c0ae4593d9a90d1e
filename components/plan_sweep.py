"""KFP component: plan_sweep. Logic: transferkit.sweep.plan."""

from kfp import dsl
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan_sweep(config: dict) -> list:
    """Expand the config's sweep into one single-strategy config per branch.

    Args:
        config: the sweep configuration (transferkit.config.PipelineConfig as a dict).

    Returns:
        The branch configs, in the order compare_strategies reports them.
    """
    from transferkit import config as cfg
    from transferkit.logs import configure_logging
    from transferkit.sweep import plan

    configure_logging()
    return [branch.config for branch in plan(cfg.PipelineConfig.model_validate(config))]
