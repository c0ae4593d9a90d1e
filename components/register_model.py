"""KFP component: register_model. Logic: transferkit.registry.register_model."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register_model(
    config: dict,
    dataset: Input[Dataset],
    backbone: Input[Model],
    model: Input[Model],
    evaluation: Input[Artifact],
    pipeline_run_id: str,
    mlflow_run_id: str,
    registration: Output[Artifact],
) -> None:
    """Log the run to MLflow, register the model and promote it if it beats the champion.

    Args:
        config: the parts of the run configuration this step reads
            (transferkit.step_inputs).
        dataset: output of ingest_data.
        backbone: output of fetch_backbone.
        model: output of train.
        evaluation: output of evaluate.
        pipeline_run_id: the KFP run id, recorded on the MLflow run and model version.
        mlflow_run_id: the pipeline run's MLflow run (open_run's output), logged into.
        registration: JSON with the model URI, version and champion decision.
    """
    from pathlib import Path

    from transferkit.logs import configure_logging
    from transferkit.registry import register_model as register
    from transferkit.retry import retry_transient
    from transferkit.step_inputs import step_config

    configure_logging()
    settings = step_config(config, "register_model")
    # Registering again after a lost connection reuses the version an attempt left (found
    # by the model's fingerprint) and takes over its own promotion lock.
    result = retry_transient(
        "register_model",
        lambda: register(
            settings,
            Path(dataset.path),
            Path(backbone.path),
            Path(model.path),
            Path(evaluation.path),
            pipeline_run_id,
            Path(registration.path),
            mlflow_run_id,
        ),
    )
    registration.metadata.update(
        {"model_uri": result.model_uri, "champion": result.champion, "version": result.version}
    )
