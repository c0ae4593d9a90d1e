"""KFP component: close_run, the exit step. Logic: transferkit.tracking.close_run."""

from kfp import dsl
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def close_run(
    config: dict, step: str, pipeline_run_id: str, status: dsl.PipelineTaskFinalStatus
) -> None:
    """End the pipeline run's MLflow run, whether the DAG succeeded or failed; never cached.

    Args:
        config: the registration's part of the run configuration (transferkit.step_inputs).
        step: the step whose part ``config`` is.
        pipeline_run_id: the KFP run id the first step tagged the run with.
        status: how the DAG ended (KFP's final status of the exit handler's body).
    """
    from transferkit.logs import configure_logging
    from transferkit.retry import retry_transient
    from transferkit.step_inputs import step_config
    from transferkit.tracking import close_run as close_tracking_run

    configure_logging()
    settings = step_config(config, step)
    # KFP's message names the failed task at best; `transferkit run` records the step's own
    # one-line error after this (transferkit.tracking.record_failure).
    error = "" if status.state == "SUCCEEDED" else str(status.error_message or "")
    retry_transient(
        "close_run", lambda: close_tracking_run(settings, pipeline_run_id, status.state, error)
    )
