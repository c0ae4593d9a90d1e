"""The multi-node TrainJob as a cluster reads it: parsed strictly by the Kubeflow Trainer's own
API models (kubeflow-trainer-api), with the training step's placement on every node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transferkit.components.images import CUDA_IMAGE

from tests.stand_ins.trainjobs import parse_strictly
from transferkit.config import PipelineConfig, load_config
from transferkit.errors import TrainingError
from transferkit.step_inputs import step_slice
from transferkit.training.trainjob import (
    artifact_uri,
    job_name,
    train_job_manifest,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
GPU_EXAMPLE = ROOT / "examples" / "sst2-gpu.yaml"
INPUTS = {
    "dataset": "s3://root/run/ingest-data/dataset",
    "backbone": "s3://root/run/fetch-backbone/backbone",
    "features": "s3://root/run/extract-features/features",
}


def gpu_config(*overrides: str) -> PipelineConfig:
    return load_config(GPU_EXAMPLE, ["training.nodes=4", "training.processes=8", *overrides])


def manifest(config: PipelineConfig) -> dict[str, Any]:
    return train_job_manifest(
        config,
        job_name("launcher-pod-abc"),
        "transferkit",
        INPUTS,
        "s3://root/run/train/model-nodes/",
        CUDA_IMAGE,
        ("launcher-pod-abc", "0f4c2a"),
    )


def test_the_gpu_example_on_four_nodes_is_a_strictly_valid_train_job() -> None:
    config = gpu_config()
    body = manifest(config)
    job = parse_strictly(body)
    assert job.kind == "TrainJob"
    assert job.api_version == "trainer.kubeflow.org/v1alpha1"
    spec = body["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = spec["trainer"]
    assert trainer["image"] == CUDA_IMAGE
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    resources = trainer["resourcesPerNode"]
    assert resources["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert resources["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "1"}
    args = trainer["args"]
    assert args[args.index("--dataset") + 1] == INPUTS["dataset"]
    assert args[args.index("--output") + 1] == "s3://root/run/train/model-nodes/"
    # The nodes train exactly the run's config (pod settings are not part of it).
    sent = json.loads(args[args.index("--config-json") + 1])
    assert sent == step_slice(config, "train")
    # Credentials only by Secret reference.
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e
    }
    assert secrets["AWS_ACCESS_KEY_ID"] == {"name": "transferkit-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert secrets["AWS_SESSION_TOKEN"]["optional"] is True
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["spec"]["serviceAccountName"] == "transferkit-pipeline-runner"
    assert pod["metadata"]["labels"]["transferkit.dev/priority-class"] == "transferkit-training"
    owner = body["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Pod", "launcher-pod-abc", "0f4c2a")


def test_strict_parsing_rejects_what_the_schema_does_not_know() -> None:
    body = manifest(gpu_config())
    body["spec"]["trainer"]["numNode"] = 4  # misspelt
    with pytest.raises(ValueError, match="does not round-trip"):
        parse_strictly(body)
    body = manifest(gpu_config())
    body["spec"]["trainer"]["numNodes"] = "four"
    with pytest.raises(ValueError, match="validation error"):
        parse_strictly(body)


def test_a_cpu_config_without_placement_gives_a_minimal_valid_job() -> None:
    config = load_config(
        ROOT / "manifests" / "base" / "pipeline.yaml",
        ["strategy.name=full_finetune", "training.nodes=2"],
    )
    body = manifest(config)
    parse_strictly(body)
    trainer = body["spec"]["trainer"]
    assert "numProcPerNode" not in trainer  # the runtime's default: one per GPU, or auto
    assert "nvidia.com/gpu" not in json.dumps(trainer["resourcesPerNode"])


def test_job_names_are_dns_safe_and_stable_per_launcher_pod() -> None:
    name = job_name("sst2-run-abc-train-123")
    assert name == job_name("sst2-run-abc-train-123") != job_name("another-pod")
    assert len(name) <= 63
    assert name.replace("-", "").isalnum()
    assert name.islower()


def test_kfp_minio_artifacts_read_as_s3_and_other_stores_are_refused() -> None:
    assert artifact_uri("minio://mlpipeline/v2/artifacts/x") == "s3://mlpipeline/v2/artifacts/x"
    assert artifact_uri("s3://b/k") == "s3://b/k"
    with pytest.raises(TrainingError, match="set the pipeline root to an s3://"):
        artifact_uri("gs://bucket/root/x")


class Scripted:
    """A stand-in API that answers get() from a script of statuses (no cluster here)."""

    def __init__(self, *answers: dict[str, Any] | Exception) -> None:
        self.answers = list(answers)

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        raise AssertionError("not used")

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def status(kind: str, **extra: str) -> dict[str, Any]:
    return {"status": {"conditions": [{"type": kind, "status": "True", **extra}]}}


def test_wait_for_polls_until_complete_and_reports_failures() -> None:
    slept: list[float] = []
    api = Scripted({}, status("Created"), status("Complete"))
    wait_for(api, "ns", "job", poll_seconds=7, sleep=slept.append)
    assert slept == [7, 7]
    with pytest.raises(TrainingError, match="TrainJob ns/job failed: OOMKilled: node 1 ran out"):
        wait_for(
            Scripted(status("Failed", reason="OOMKilled", message="node 1 ran out")),
            "ns",
            "job",
            sleep=slept.append,
        )
    with pytest.raises(TrainingError, match=r"cannot be read \(ApiException\); was it deleted"):
        wait_for(Scripted(type("ApiException", (Exception,), {})()), "ns", "job")
