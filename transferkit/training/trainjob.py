"""Multi-node fine-tuning: the training step as a Kubeflow Trainer ``TrainJob``.

With ``training.nodes`` > 1 the pipeline's training task is a small launcher (CPU image): it
writes a TrainJob (trainer.kubeflow.org/v1alpha1) that runs the same training entry point on
every node (``python -m transferkit.training.node``) under the cluster's torch runtime
(``kubernetes.trainer_runtime``, default the stock ``torch-distributed``), waits for it, and
copies the model the first node uploaded into the step's output artifact. The nodes get
the training step's resources per node (GPUs included), node selector, tolerations, priority
label, ServiceAccount and the S3 Secret — the same placement a single training pod gets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.errors import TrainingError
from transferkit.step_inputs import step_slice
from transferkit.training.kube_api import (
    GROUP,
    VERSION,
    KubernetesTrainJobs,
    TrainJobApi,
    TrainJobApiError,
)

log = logging.getLogger(__name__)

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_SESSION_TOKEN",)
PRIORITY_LABEL = "transferkit.dev/priority-class"
NODE_JOB = "node"  # the replicated job of the torch runtimes that runs the trainer


# What to do about an answer of the API server, by its status.
_API_HINTS = {
    401: "the API server refused the launcher's credentials",
    403: "give the pipeline's ServiceAccount create and get on trainjobs.trainer.kubeflow.org "
    "(manifests/base/rbac.yaml)",
    404: "is Kubeflow Trainer installed in the cluster, and does the namespace exist?",
}


def artifact_uri(uri: str) -> str:
    """A KFP artifact URI as the storage layer reads it (KFP's MinIO store speaks S3).

    Raises:
        TrainingError: a store the nodes cannot read.
    """
    if uri.startswith("minio://"):
        return "s3://" + uri.removeprefix("minio://")
    if uri.startswith(("s3://", "/", "file://")):
        return uri
    raise TrainingError(
        f"artifact {uri}: multi-node training reads artifacts from S3; set the pipeline "
        "root to an s3:// (or KFP MinIO) location"
    )


def job_name(owner: str | None) -> str:
    """A DNS-safe TrainJob name, stable for one launcher pod."""
    seed = owner or uuid.uuid4().hex
    return "transferkit-" + hashlib.sha256(seed.encode()).hexdigest()[:12]


def _resources(config: PipelineConfig) -> dict[str, Any]:
    spec = config.resources.train
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for kind in ("cpu", "memory"):
        if getattr(spec, f"{kind}_request"):
            requests[kind] = getattr(spec, f"{kind}_request")
        if getattr(spec, f"{kind}_limit"):
            limits[kind] = getattr(spec, f"{kind}_limit")
    if spec.accelerator:
        count = str(spec.accelerator.count)
        requests[spec.accelerator.type] = limits[spec.accelerator.type] = count
    found: dict[str, Any] = {}
    if requests:
        found["requests"] = requests
    if limits:
        found["limits"] = limits
    return found


def _secret_env(config: PipelineConfig) -> list[dict[str, Any]]:
    secret = config.kubernetes.s3_secret
    if not secret:
        return []
    env: list[dict[str, Any]] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for key in S3_KEYS
    ]
    env += [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}},
        }
        for key in S3_OPTIONAL_KEYS
    ]
    return env


def train_job_manifest(
    config: PipelineConfig,
    name: str,
    namespace: str,
    inputs: dict[str, str],
    output: str,
    image: str,
    owner: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob that trains ``config`` on ``training.nodes`` nodes.

    Args:
        inputs: URIs of the dataset, backbone and features artifacts.
        output: folder URI the first node uploads the model to.
        owner: (name, uid) of the launcher pod, which then owns the job (deleting the pod
            deletes it).
    """
    spec = config.resources.train
    labels = {"app.kubernetes.io/part-of": "transferkit", "transferkit.dev/step": "train"}
    pod_labels = dict(labels)
    if spec.priority_class:
        pod_labels[PRIORITY_LABEL] = spec.priority_class
    trainer: dict[str, Any] = {
        "image": image,
        "command": ["python", "-m", "transferkit.training.node"],
        "args": [
            "--config-json",
            json.dumps(step_slice(config, "train"), sort_keys=True, separators=(",", ":")),
            "--dataset",
            inputs["dataset"],
            "--backbone",
            inputs["backbone"],
            "--features",
            inputs["features"],
            "--output",
            output,
        ],
        "numNodes": config.training.nodes,
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, *_secret_env(config)],
    }
    if config.training.processes:
        trainer["numProcPerNode"] = config.training.processes
    resources = _resources(config)
    if resources:
        trainer["resourcesPerNode"] = resources
    pod_spec: dict[str, Any] = {}
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [
            {
                k: v
                for k, v in {
                    "key": t.key,
                    "operator": t.operator,
                    "value": t.value,
                    "effect": t.effect,
                    "tolerationSeconds": t.toleration_seconds,
                }.items()
                if v is not None
            }
            for t in spec.tolerations
        ]
    if config.kubernetes.service_account:
        pod_spec["serviceAccountName"] = config.kubernetes.service_account
    pod_template: dict[str, Any] = {"metadata": {"labels": pod_labels}}
    if pod_spec:
        pod_template["spec"] = pod_spec
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": owner[0], "uid": owner[1]}
        ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {
                "apiGroup": GROUP,
                "kind": "ClusterTrainingRuntime",
                "name": config.kubernetes.trainer_runtime,
            },
            "trainer": trainer,
            "runtimePatches": [
                {
                    "manager": "transferkit.dev/pipeline",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {
                                        "name": NODE_JOB,
                                        "template": {"spec": {"template": pod_template}},
                                    }
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def _owner_uids(job: dict[str, Any]) -> list[str]:
    return [o.get("uid", "") for o in job.get("metadata", {}).get("ownerReferences", [])]


def create(api: TrainJobApi, namespace: str, body: dict[str, Any]) -> None:
    """Create the TrainJob ``body``, or find the one the same launcher pod created before a
    retry (same name, same owner) and keep that.

    Raises:
        TrainingError: the API server refused it (what it said, and what to do).
    """
    name = body["metadata"]["name"]
    try:
        api.create(namespace, body)
        nodes = body["spec"]["trainer"]["numNodes"]
        log.info("created TrainJob %s/%s: %d nodes", namespace, name, nodes)
        return
    except TrainJobApiError as exc:
        error = exc
    hint = _API_HINTS.get(error.status or 0)
    if error.status == 409:
        try:
            existing = api.get(namespace, name)
        except TrainJobApiError:
            existing = {}
        owner = _owner_uids(body)
        if owner and _owner_uids(existing) == owner:
            log.info("TrainJob %s/%s exists already (this pod's): waiting for it", namespace, name)
            return
        hint = (
            "it is not this launcher pod's: delete it "
            f"(kubectl delete trainjob -n {namespace} {name}) or rename it"
        )
    raise TrainingError(
        f"TrainJob {namespace}/{name} cannot be created ({error})" + (f"; {hint}" if hint else ""),
        transient=error.transient,
    )


def wait_for(
    api: TrainJobApi,
    namespace: str,
    name: str,
    poll_seconds: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Block until the TrainJob completes.

    Raises:
        TrainingError: the job failed (its reason and message) or vanished.
    """
    seen: set[tuple[str, str]] = set()
    while True:
        try:
            job = api.get(namespace, name)
        except TrainJobApiError as exc:
            hint = "was it deleted?" if exc.status == 404 else _API_HINTS.get(exc.status or 0)
            raise TrainingError(
                f"TrainJob {namespace}/{name} cannot be read ({exc})"
                + (f"; {hint}" if hint else ""),
                transient=exc.transient,
            ) from None
        except Exception as exc:
            raise TrainingError(
                f"TrainJob {namespace}/{name} cannot be read ({type(exc).__name__}); was it "
                "deleted?"
            ) from None
        for condition in job.get("status", {}).get("conditions", []):
            kind, status = condition.get("type", ""), condition.get("status", "")
            if (kind, status) not in seen:
                seen.add((kind, status))
                log.info("TrainJob %s: %s=%s %s", name, kind, status, condition.get("message", ""))
            if status != "True":
                continue
            if kind == "Complete":
                return
            if kind == "Failed":
                raise TrainingError(
                    f"TrainJob {namespace}/{name} failed: {condition.get('reason', '')}: "
                    f"{condition.get('message', '')}".rstrip(": ")
                )
        sleep(poll_seconds)


def run_train_job(
    config: PipelineConfig,
    inputs: dict[str, str],
    model_uri: str,
    model_dir: Path,
    namespace: str,
    owner: tuple[str, str] | None = None,
    api: TrainJobApi | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Train on ``training.nodes`` nodes and put the model in ``model_dir``.

    Args:
        inputs: KFP URIs of the dataset, backbone and features artifacts.
        model_uri: the KFP URI of the step's model artifact; the nodes upload next to it.
        namespace: where the TrainJob is created (the launcher pod's namespace).
        owner: (name, uid) of the launcher pod, which then owns the job; it also names it.

    Returns:
        The model's training.json.

    Raises:
        TrainingError: the job failed; nothing is written to ``model_dir``.
    """
    from transferkit.containers import CPU_IMAGE, CUDA_IMAGE

    api = api or KubernetesTrainJobs()
    name = job_name(owner[0] if owner else None)
    output = artifact_uri(model_uri).rstrip("/") + "-nodes/"
    image = CUDA_IMAGE if config.resources.train.accelerator else CPU_IMAGE
    body = train_job_manifest(
        config,
        name,
        namespace,
        {key: artifact_uri(uri) for key, uri in inputs.items()},
        output,
        image,
        owner,
    )
    create(api, namespace, body)
    wait_for(api, namespace, name, sleep=sleep)
    storage.download_tree(output, model_dir, config.storage)
    training: dict[str, Any] = storage.read_json(model_dir / "training.json")
    return training
