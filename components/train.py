"""KFP component: train. Logic: transferkit.training.train."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output
from transferkit.components.images import CPU_IMAGE, CUDA_IMAGE


def train(
    config: dict,
    dataset: Input[Dataset],
    backbone: Input[Model],
    features: Input[Dataset],
    model: Output[Model],
) -> None:
    """Train a classifier with the configured transfer strategy.

    Args:
        config: the parts of the run configuration this step reads
            (transferkit.step_inputs).
        dataset: output of ingest_data.
        backbone: output of fetch_backbone.
        features: output of extract_features.
        model: the classifier folder (encoder, head, transferkit.json, training.json).
    """
    from pathlib import Path

    from transferkit.logs import configure_logging
    from transferkit.retry import retry_transient
    from transferkit.step_inputs import step_config
    from transferkit.training import artifact_metadata
    from transferkit.training import train as fit

    configure_logging()
    settings = step_config(config, "train")
    # S3 may fail under training (unlabelled text, checkpoints): a retry resumes from the
    # last checkpoint when training.checkpoint_every_steps is set.
    result = retry_transient(
        "train",
        lambda: fit(
            settings,
            Path(dataset.path),
            Path(backbone.path),
            Path(features.path),
            Path(model.path),
        ),
    )
    model.metadata.update(artifact_metadata(result.model_dump()))


def train_nodes(
    config: dict,
    dataset: Input[Dataset],
    backbone: Input[Model],
    features: Input[Dataset],
    model: Output[Model],
) -> None:
    """Train on training.nodes nodes: create a Kubeflow Trainer TrainJob, wait for it, and
    keep the model its first node uploaded. Inputs and output as in ``train``."""
    import os
    from pathlib import Path

    from transferkit.logs import configure_logging
    from transferkit.retry import retry_transient
    from transferkit.step_inputs import step_config
    from transferkit.training import artifact_metadata
    from transferkit.training.trainjob import run_train_job

    configure_logging()
    settings = step_config(config, "train_nodes")
    # The pod's identity, from the field references the pipeline adds to this task.
    pod = os.environ.get("POD_NAME"), os.environ.get("POD_UID")
    # The API server may blink: a retry finds the job it created by its name and waits.
    result = retry_transient(
        "train",
        lambda: run_train_job(
            settings,
            {"dataset": dataset.uri, "backbone": backbone.uri, "features": features.uri},
            model.uri,
            Path(model.path),
            os.environ["POD_NAMESPACE"],
            (pod[0], pod[1]) if pod[0] and pod[1] else None,
        ),
    )
    model.metadata.update(artifact_metadata(result))


# The launcher of a multi-node TrainJob runs in the CPU image: the nodes have the GPUs.
train_nodes = dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)(train_nodes)
# The same step in the CUDA image, for a training pod on an accelerator node pool
# (resources.train.accelerator); the pipelines pick one of the two when they are built.
train_cuda = dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)(train)
train = dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)(train)
