"""Wiring shared by the pipelines: per-step options and the common ingest → extract prefix.

Everything a cluster reads about a step — caching, pod labels, resources, placement and the
Secrets its credentials come from — is set here, from the configuration the pipeline is built
with (``transferkit compile CONFIG``); the local runner ignores the Kubernetes parts.

No step has a KFP retry policy: it would run a step again after any failure, bad input
included, and cannot tell one error from another. The steps that talk to S3 or MLflow retry
transient errors inside their own process instead (``transferkit.retry``).
"""

import contextlib
from collections.abc import Iterator
from typing import Any

from kfp import dsl, kubernetes
from transferkit.components import (
    close_run,
    evaluate,
    extract_features,
    fetch_backbone,
    ingest_data,
    open_run,
    register_model,
    train,
    train_cuda,
    train_nodes,
)

from transferkit.config import KubernetesConfig, PipelineConfig, ResourcesConfig, StepResources
from transferkit.storage import CACHE_ENV
from transferkit.tracking import (
    EXPERIMENT_ENV,
    PIPELINE_RUN_ENV,
    STEP_ENV,
    TRACKING_URI_ENV,
    redact,
)

# KFP 2.17 cannot set spec.priorityClassName; manifests/overlays/gpu maps this label onto it.
from transferkit.training.trainjob import PRIORITY_LABEL, S3_KEYS, S3_OPTIONAL_KEYS

# Steps that read or write object storage: the data, the backbone, unlabelled text for domain
# adaptation, and model artifacts that MLflow stores in S3.
S3_STEPS = frozenset({"ingest_data", "fetch_backbone", "train", "register_model"})
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
CACHE_MOUNT = "/var/cache/transferkit/backbones"
LAUNCHER = StepResources(cpu_request="100m", memory_request="1Gi", memory_limit="2Gi")
# The steps that open and close the pipeline run's MLflow run (no resources.* of their own).
BOOKKEEPING = StepResources(cpu_request="100m", memory_request="512Mi", memory_limit="1Gi")
POD_FIELDS = {
    "POD_NAME": "metadata.name",
    "POD_UID": "metadata.uid",
    "POD_NAMESPACE": "metadata.namespace",
}
# Every step's pod: the pipeline run and the step, so that a failing step records its own
# one-line error on the pipeline run's MLflow run (transferkit.tracking.report_failures).
STEP_FIELDS = {
    PIPELINE_RUN_ENV: "metadata.labels['pipeline/runid']",  # KFP's run id, as open_run's
    STEP_ENV: "metadata.labels['transferkit.dev/step']",
}


class Cluster:
    """The compile-time settings of the pods: resources per step and credential Secrets."""

    def __init__(self, config: PipelineConfig | None = None) -> None:
        """From the config the pipeline is built with; unset: default resources, no Secrets."""
        self.resources = config.resources if config else ResourcesConfig()
        self.secrets = config.kubernetes if config else KubernetesConfig()
        self.nodes = config.training.nodes if config else 1
        # Where a failing step records its error: the configured tracking server (without
        # credentials: they come from the MLflow Secret). Unset, a step falls back to the pod's
        # MLFLOW_TRACKING_URI; a local SQLite store is not reachable from pods.
        self.tracking: dict[str, str] = {}
        uri = config.registry.tracking_uri if config else None
        if config and uri and uri.startswith(("http://", "https://", "databricks")):
            self.tracking = {
                TRACKING_URI_ENV: redact(uri),
                EXPERIMENT_ENV: config.registry.experiment,
            }

    def train_component(self) -> Any:
        """The training component: a TrainJob launcher for several nodes, else the CUDA image
        when training asks for accelerators."""
        if self.nodes > 1:
            return train_nodes
        return train_cuda if self.resources.train.accelerator else train

    def apply(self, task: dsl.PipelineTask, name: str) -> None:
        spec: StepResources = getattr(self.resources, name, None) or BOOKKEEPING
        if name == "train" and self.nodes > 1:
            # The launcher only creates and watches the TrainJob, whose nodes get resources.train
            # and its placement; it needs its own pod's identity to own the job.
            spec = LAUNCHER
            for variable, path in POD_FIELDS.items():
                kubernetes.use_field_path_as_env(task, variable, path)
        if spec.cpu_request:
            task.set_cpu_request(spec.cpu_request)
        if spec.cpu_limit:
            task.set_cpu_limit(spec.cpu_limit)
        if spec.memory_request:
            task.set_memory_request(spec.memory_request)
        if spec.memory_limit:
            task.set_memory_limit(spec.memory_limit)
        if spec.accelerator:
            task.set_accelerator_type(spec.accelerator.type)
            task.set_accelerator_limit(spec.accelerator.count)
        for key, value in spec.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for toleration in spec.tolerations:
            kubernetes.add_toleration(
                task,
                key=toleration.key,
                operator=toleration.operator,
                value=toleration.value,
                effect=toleration.effect,
                toleration_seconds=toleration.toleration_seconds,
            )
        if spec.priority_class:
            kubernetes.add_pod_label(task, PRIORITY_LABEL, spec.priority_class)
        # Secret keys become environment variables of the pod; only the Secret's name is
        # in the YAML. Optional keys may be absent from the Secret.
        if self.secrets.s3_secret and name in S3_STEPS:
            kubernetes.use_secret_as_env(task, self.secrets.s3_secret, {k: k for k in S3_KEYS})
            kubernetes.use_secret_as_env(
                task, self.secrets.s3_secret, {k: k for k in S3_OPTIONAL_KEYS}, optional=True
            )
        if self.secrets.backbone_cache_pvc and name == "fetch_backbone":
            kubernetes.mount_pvc(task, self.secrets.backbone_cache_pvc, mount_path=CACHE_MOUNT)
            task.set_env_variable(CACHE_ENV, CACHE_MOUNT)
        for variable, path in STEP_FIELDS.items():
            kubernetes.use_field_path_as_env(task, variable, path)
        for variable, value in self.tracking.items():
            task.set_env_variable(variable, value)
        # Every step may write its failure to MLflow; these three always talk to it.
        if self.secrets.mlflow_secret:
            kubernetes.use_secret_as_env(
                task, self.secrets.mlflow_secret, {k: k for k in MLFLOW_KEYS}, optional=True
            )


def step(task: dsl.PipelineTask, name: str, cache: bool, cluster: Cluster) -> dsl.PipelineTask:
    """Caching, pod labels, resources, placement and credentials of one step.

    Pod labels let cluster tooling (cost reports, policies, log search) find transferkit pods.
    """
    task.set_caching_options(enable_caching=cache)
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "transferkit")
    kubernetes.add_pod_label(task, "transferkit.dev/step", name)
    cluster.apply(task, name)
    return task


@contextlib.contextmanager
def tracked(
    config: Any, config_step: str, pipeline_name: str, cluster: Cluster
) -> Iterator[dsl.PipelineTask]:
    """The pipeline run's MLflow run around the DAG built inside: open_run first, close_run as
    the exit handler's exit task (it runs whether the DAG succeeded or failed). Neither is
    cached; no cached step takes their outputs, so caching is unchanged.

    Args:
        config: the registration's part of the config (it reads everything), a run
            parameter, and ``config_step``, the step it is the part of.

    Yields:
        open_run's task: its output is the MLflow run id that registration logs into.
    """
    close = step(
        close_run(config=config, step=config_step, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
        "close_run",
        cache=False,
        cluster=cluster,
    )
    with dsl.ExitHandler(close, name="tracked-run"):
        yield step(
            open_run(
                config=config,
                step=config_step,
                pipeline_name=pipeline_name,
                pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ),
            "open_run",
            cache=False,
            cluster=cluster,
        )


def prepare(
    configs: dict[str, Any],
    data_stamp: str,
    backbone_stamp: str,
    cluster: Cluster,
    opened: dsl.PipelineTask,
) -> tuple[Any, Any, Any]:
    """ingest_data (after ``opened``, the open_run step), fetch_backbone (which may rank
    candidate backbones on the data), then extract_features, each given its own part of the
    config (``configs``, by step name).

    Returns:
        The dataset, backbone and features artifacts.
    """
    ingest = step(
        ingest_data(config=configs["ingest_data"], source_stamp=data_stamp),
        "ingest_data",
        cache=True,
        cluster=cluster,
    )
    # A run that fails in any step leaves its MLflow run FAILED: the run is opened first.
    ingest.after(opened)
    fetch = step(
        fetch_backbone(
            config=configs["fetch_backbone"],
            source_stamp=backbone_stamp,
            dataset=ingest.outputs["dataset"],
        ),
        "fetch_backbone",
        cache=True,
        cluster=cluster,
    )
    dataset, backbone = ingest.outputs["dataset"], fetch.outputs["backbone"]
    extract = step(
        extract_features(config=configs["extract_features"], dataset=dataset, backbone=backbone),
        "extract_features",
        cache=True,
        cluster=cluster,
    )
    return dataset, backbone, extract.outputs["features"]


def train_and_evaluate(
    configs: Any, dataset: Any, backbone: Any, features: Any, cluster: Cluster
) -> tuple[Any, Any]:
    """train (in the CUDA image when training asks for accelerators), then evaluate, given
    their parts of the config (``configs["train"]``, ``configs["evaluate"]``).

    Returns:
        The train and evaluate tasks.
    """
    fit = step(
        cluster.train_component()(
            config=configs["train"], dataset=dataset, backbone=backbone, features=features
        ),
        "train",
        cache=True,
        cluster=cluster,
    )
    scored = step(
        evaluate(config=configs["evaluate"], dataset=dataset, model=fit.outputs["model"]),
        "evaluate",
        cache=True,
        cluster=cluster,
    )
    return fit, scored


def register(
    config: Any,
    dataset: Any,
    backbone: Any,
    model: Any,
    evaluation: Any,
    cluster: Cluster,
    opened: dsl.PipelineTask,
) -> Any:
    """register_model: it has side effects in MLflow, so it always runs (idempotent by
    content).

    Returns:
        The registration artifact.
    """
    task = step(
        register_model(
            config=config,
            dataset=dataset,
            backbone=backbone,
            model=model,
            evaluation=evaluation,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            mlflow_run_id=opened.output,
        ),
        "register_model",
        cache=False,
        cluster=cluster,
    )
    return task.outputs["registration"]
