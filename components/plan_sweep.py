"""KFP component: plan_sweep. Logic: transferkit.sweep.plan."""

from kfp import dsl
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan_sweep(config: dict) -> list:
    """Expand the config's sweep into one single-strategy config per branch.

    Args:
        config: the parts of the sweep configuration this step reads
            (transferkit.step_inputs).

    Returns:
        Per branch, in the order compare_strategies reports them, the parts of its config
        that its train and evaluate steps read ({"train": …, "evaluate": …}).
    """
    from transferkit.logs import configure_logging
    from transferkit.step_inputs import branch_arguments, step_config
    from transferkit.sweep import plan

    configure_logging()
    return [branch_arguments(b.config) for b in plan(step_config(config, "plan_sweep"))]
