"""The multi-node TrainJob as a cluster reads it: parsed strictly by the Kubeflow Trainer's own
API models (kubeflow-trainer-api), with the training step's placement on every node; and the
launcher's real ``kubernetes`` client, from a kubeconfig, against a stand-in API server over
HTTP (tests/stand_ins/kube_apiserver.py: no cluster can run here)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transferkit.components.images import CUDA_IMAGE

from tests.stand_ins.kube_apiserver import (
    GONE,
    KubeApiStandIn,
    conditions,
    serve_kube_api,
    use_kubeconfig,
    write_kubeconfig,
)
from tests.stand_ins.trainjobs import parse_strictly
from transferkit import storage
from transferkit.config import PipelineConfig, load_config
from transferkit.errors import TrainingError
from transferkit.step_inputs import step_slice
from transferkit.training.trainjob import (
    KubernetesTrainJobs,
    TrainJobApiError,
    artifact_uri,
    job_name,
    run_train_job,
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


def first_line(error: pytest.ExceptionInfo[TrainingError]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.fixture
def kube_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeApiStandIn]:
    """The stand-in API server, and a kubeconfig that points the real client at it."""
    with serve_kube_api() as state:
        use_kubeconfig(
            monkeypatch, write_kubeconfig(tmp_path / "kubeconfig", state.url, state.token)
        )
        yield state


OWNER = ("launcher-pod-abc", "0f4c2a")
NAME = job_name(OWNER[0])
JOB_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/transferkit/trainjobs"


def launch(tmp_path: Path, slept: list[float] | None = None, **kwargs: Any) -> dict[str, Any]:
    """run_train_job as the train_nodes component calls it: no API object passed in, so the
    real client, from the kubeconfig. The first node's upload is already in place."""
    kfp_uri = str(tmp_path / "kfp" / "model")
    upload = tmp_path / "node-0"
    upload.mkdir(exist_ok=True)
    (upload / "training.json").write_text(json.dumps({"details": {"steps": 12}}))
    (upload / "weights.bin").write_bytes(b"weights")
    storage.upload_tree(upload, kfp_uri + "-nodes/")
    return run_train_job(
        gpu_config(),
        INPUTS,
        kfp_uri,
        tmp_path / "model",
        "transferkit",
        OWNER,
        sleep=(slept if slept is not None else []).append,
        **kwargs,
    )


def test_the_launcher_creates_the_job_waits_for_it_and_keeps_the_model(
    kube_api: KubeApiStandIn, tmp_path: Path
) -> None:
    kube_api.script("transferkit", NAME, {}, conditions("Created"), conditions("Complete"))
    slept: list[float] = []
    training = launch(tmp_path, slept)
    assert training == {"details": {"steps": 12}}
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"weights"
    (post,) = kube_api.sent("POST")
    assert post.path == JOB_PATH
    assert post.headers["authorization"] == f"Bearer {kube_api.token}"
    assert post.headers["content-type"] == "application/json"
    # The manifest the unit tests above check is what reached the server, whole.
    expected = train_job_manifest(
        gpu_config(),
        NAME,
        "transferkit",
        INPUTS,
        str(tmp_path / "kfp" / "model") + "-nodes/",
        CUDA_IMAGE,
        OWNER,
    )
    assert post.body == expected
    assert post.body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "launcher-pod-abc", "uid": "0f4c2a"}
    ]
    assert post.body["metadata"]["labels"]["transferkit.dev/step"] == "train"
    # Polled until Complete, waiting the default interval between reads; nothing else asked
    # (the stand-in grants only the verbs manifests/base/rbac.yaml grants).
    assert [r.path for r in kube_api.sent("GET")] == [f"{JOB_PATH}/{NAME}"] * 3
    assert slept == [15.0, 15.0]
    assert {r.method for r in kube_api.requests} == {"POST", "GET"}


def test_wait_for_polls_at_the_interval_given(kube_api: KubeApiStandIn) -> None:
    kube_api.put(manifest(gpu_config()))
    kube_api.script("transferkit", NAME, conditions("Created"), conditions("Complete"))
    slept: list[float] = []
    wait_for(KubernetesTrainJobs(), "transferkit", NAME, poll_seconds=7, sleep=slept.append)
    assert slept == [7]


def test_a_failed_job_fails_the_step_in_one_line_and_keeps_no_model(
    kube_api: KubeApiStandIn, tmp_path: Path
) -> None:
    failed = conditions("Failed", "OOMKilled", "node 1 ran out\nof memory")
    kube_api.script("transferkit", NAME, conditions("Created"), failed)
    with pytest.raises(TrainingError) as error:
        launch(tmp_path)
    assert first_line(error) == (
        f"TrainJob transferkit/{NAME} failed: OOMKilled: node 1 ran out of memory"
    )
    assert not (tmp_path / "model").exists()


def test_a_job_deleted_while_waiting_is_a_one_line_error(
    kube_api: KubeApiStandIn, tmp_path: Path
) -> None:
    kube_api.script("transferkit", NAME, conditions("Created"), GONE)
    with pytest.raises(TrainingError) as error:
        launch(tmp_path)
    assert first_line(error) == (
        f"TrainJob transferkit/{NAME} cannot be read (404 Not Found: "
        f'trainjobs.trainer.kubeflow.org "{NAME}" not found); was it deleted?'
    )
    assert not error.value.transient
    assert not (tmp_path / "model").exists()


def test_refused_credentials_and_missing_grants_are_one_line_errors(
    kube_api: KubeApiStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube_api.verbs = {"get"}
    with pytest.raises(TrainingError) as error:
        launch(tmp_path)
    assert first_line(error) == (
        f"TrainJob transferkit/{NAME} cannot be created (403 Forbidden: "
        "trainjobs.trainer.kubeflow.org is forbidden: User "
        '"system:serviceaccount:transferkit:transferkit-pipeline-runner" cannot create resource '
        '"trainjobs" in API group "trainer.kubeflow.org" in the namespace "transferkit"); '
        "give the pipeline's ServiceAccount create and get on trainjobs.trainer.kubeflow.org "
        "(manifests/base/rbac.yaml)"
    )
    kube_api.verbs = {"create"}
    with pytest.raises(TrainingError, match=r"cannot be read \(403 Forbidden: .* cannot get "):
        launch(tmp_path)
    kubeconfig = write_kubeconfig(tmp_path / "stale", kube_api.url, "an-expired-token")
    use_kubeconfig(monkeypatch, kubeconfig)
    with pytest.raises(TrainingError) as error:
        launch(tmp_path)
    assert first_line(error) == (
        f"TrainJob transferkit/{NAME} cannot be created (401 Unauthorized: Unauthorized); "
        "the API server refused the launcher's credentials"
    )
    assert not error.value.transient
    assert not (tmp_path / "model").exists()


def test_a_cluster_without_kubeflow_trainer_is_a_one_line_error(
    kube_api: KubeApiStandIn, tmp_path: Path
) -> None:
    kube_api.installed = False
    with pytest.raises(TrainingError) as error:
        launch(tmp_path)
    assert first_line(error) == (
        f"TrainJob transferkit/{NAME} cannot be created (404 Not Found: the server could not "
        "find the requested resource); is Kubeflow Trainer installed in the cluster, and does "
        "the namespace exist?"
    )


def test_a_retry_of_the_same_launcher_pod_waits_for_the_job_it_created(
    kube_api: KubeApiStandIn, tmp_path: Path
) -> None:
    # The first attempt created the job, then lost its connection; the retry finds it.
    kube_api.put(manifest(gpu_config()))
    kube_api.script("transferkit", NAME, conditions("Created"), conditions("Complete"))
    assert launch(tmp_path) == {"details": {"steps": 12}}
    answered = [(r.method, r.code) for r in kube_api.requests]
    assert answered == [("POST", 409), ("GET", 200), ("GET", 200)]  # owner, then Complete
    assert len(kube_api.objects) == 1


def test_a_name_taken_by_another_owner_is_a_one_line_error(
    kube_api: KubeApiStandIn, tmp_path: Path
) -> None:
    other = manifest(gpu_config())
    other["metadata"]["ownerReferences"][0]["uid"] = "another-pod-uid"
    kube_api.put(other)
    with pytest.raises(TrainingError) as error:
        launch(tmp_path)
    assert first_line(error) == (
        f"TrainJob transferkit/{NAME} cannot be created (409 Conflict: "
        f'trainjobs.trainer.kubeflow.org "{NAME}" already exists); it is not this launcher '
        f"pod's: delete it (kubectl delete trainjob -n transferkit {NAME}) or rename it"
    )
    assert [r.method for r in kube_api.requests] == ["POST", "GET"]  # looked, did not wait


def test_an_unreachable_api_server_is_a_transient_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_kube_api() as state:
        pass  # stopped: its port now refuses connections
    use_kubeconfig(monkeypatch, write_kubeconfig(tmp_path / "kubeconfig", state.url, state.token))
    with pytest.raises(TrainingError) as error:
        launch(tmp_path)
    text = first_line(error)
    assert text.startswith(
        f"TrainJob transferkit/{NAME} cannot be created (the Kubernetes API server at "
        f"{state.url} cannot be reached ("
    )
    assert "Connection refused" in text
    assert error.value.transient  # the step's retry may run it again


def test_the_stand_in_refuses_what_the_api_server_would(kube_api: KubeApiStandIn) -> None:
    api = KubernetesTrainJobs()
    body = manifest(gpu_config())
    changes: list[tuple[str, dict[str, Any], str]] = [
        ("kind", {"kind": "Job"}, "kind: Invalid value: 'Job'"),
        ("apiVersion", {"apiVersion": "trainer.kubeflow.org/v1"}, "apiVersion: Invalid value"),
        ("name", {"metadata": {**body["metadata"], "name": "Not_DNS"}}, "metadata.name"),
        ("schema", {"spec": {**body["spec"], "trainer": {"numNode": 2}}}, "does not round-trip"),
    ]
    for where, change, expected in changes:
        with pytest.raises(TrainJobApiError) as refused:
            api.create("transferkit", {**body, **change})
        assert refused.value.status == 422, where
        assert str(refused.value).startswith("422 Unprocessable Entity: TrainJob"), where
        assert expected in str(refused.value), where
    with pytest.raises(TrainJobApiError, match="400 Bad Request: the namespace of the provided"):
        api.create("elsewhere", body)
    assert kube_api.objects == {}
    api.create("transferkit", body)
    with pytest.raises(TrainJobApiError, match=f'409 Conflict: .*"{NAME}" already exists'):
        api.create("transferkit", body)
    stored = api.get("transferkit", NAME)
    assert stored["metadata"]["uid"]
    assert stored["spec"] == body["spec"]
