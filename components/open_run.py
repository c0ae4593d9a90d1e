"""KFP component: open_run, the first step. Logic: transferkit.tracking.open_run."""

from kfp import dsl
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def open_run(config: dict, step: str, pipeline_name: str, pipeline_run_id: str) -> str:
    """Open the pipeline run's MLflow run (params, system tags); never cached.

    Args:
        config: the registration's part of the run configuration (it reads everything;
            transferkit.step_inputs), logged as the run's params.
        step: the step whose part ``config`` is (register_model, or a sweep's
            compare_strategies).
        pipeline_name: the pipeline's name, the run's source.
        pipeline_run_id: the KFP run id, tagged on the run.

    Returns:
        The MLflow run id, which registration logs into.
    """
    from transferkit.logs import configure_logging
    from transferkit.retry import retry_transient
    from transferkit.step_inputs import step_config
    from transferkit.tracking import open_run as open_tracking_run

    configure_logging()
    settings = step_config(config, step)
    return retry_transient(
        "open_run", lambda: open_tracking_run(settings, pipeline_run_id, pipeline_name)
    )
