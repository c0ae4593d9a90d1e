"""What a cluster reads from a compiled pipeline: pod resources, GPU placement, the CUDA image,
Secrets as environment variables, retries — and no credential anywhere in the YAML.

There is no Kubernetes cluster here: the YAML is parsed strictly into the KFP IR and each
executor's platform config into kfp-kubernetes' KubernetesExecutorConfig, as a KFP backend
would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format
from transferkit.components.images import CPU_IMAGE, CUDA_IMAGE
from transferkit.pipelines.wiring import STEP_FIELDS

from tests.pipelines.test_compile import parse
from transferkit.cli import main

ROOT = Path(__file__).resolve().parents[2]
GPU_EXAMPLE = ROOT / "examples" / "sst2-gpu.yaml"
# Dummy credentials present in the environment while compiling: none may reach the YAML.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIATRANSFERKITDUMMY",
    "AWS_SECRET_ACCESS_KEY": "dummy/secret+TransferkitKey0123456789",
    "MLFLOW_TRACKING_PASSWORD": "dummy-mlflow-password-0123",
}
S3_STEPS = {"ingest-data", "fetch-backbone", "train", "register-model"}


def compile_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str, config: Path = GPU_EXAMPLE
) -> tuple[Path, dict, dict]:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "pipeline.yaml"
    args = ["compile", str(config), "--output", str(out)]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    spec, platform = parse(out)  # strict, as the KFP backend parses it
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return out, executors, kube


def step_of(executor: str) -> str:
    return executor.removeprefix("exec-")


def test_gpu_request_selector_and_tolerations_on_the_training_task_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, executors, kube = compile_config(tmp_path, monkeypatch)
    assert set(map(step_of, executors)) == {
        "open-run", "ingest-data", "fetch-backbone", "extract-features", "train", "evaluate",
        "register-model", "close-run",
    }  # fmt: skip
    for name, executor in executors.items():
        container = executor["container"]
        resources = container.get("resources", {})
        placement = kube.get(name, {})
        if step_of(name) == "train":
            assert container["image"] == CUDA_IMAGE
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
            assert resources["resourceCpuRequest"] == "4"
            assert resources["resourceMemoryRequest"] == "16Gi"
            assert resources["resourceMemoryLimit"] == "32Gi"
            assert placement["nodeSelector"]["labels"] == {
                "cloud.google.com/gke-accelerator": "nvidia-l4"
            }
            assert placement["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
            labels = placement["podMetadata"]["labels"]
            assert labels["transferkit.dev/priority-class"] == "transferkit-training"
        else:
            assert container["image"] == CPU_IMAGE
            assert "accelerator" not in resources
            assert "nodeSelector" not in placement
            assert "tolerations" not in placement
            assert "transferkit.dev/priority-class" not in placement["podMetadata"]["labels"]
            assert resources["resourceCpuRequest"]  # every step has a request
    extract = executors["exec-extract-features"]["container"]["resources"]
    assert extract["resourceMemoryLimit"] == "16Gi"


def test_secrets_reach_only_the_steps_that_need_them_and_no_credential_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, executors, kube = compile_config(tmp_path, monkeypatch)
    for name in executors:
        secrets = {
            entry["secretName"]: entry for entry in kube.get(name, {}).get("secretAsEnv", [])
        }
        mounted = {
            (entry["secretName"], key["envVar"])
            for entry in kube.get(name, {}).get("secretAsEnv", [])
            for key in entry["keyToEnv"]
        }
        if step_of(name) in S3_STEPS:
            assert ("transferkit-s3", "AWS_ACCESS_KEY_ID") in mounted
            assert ("transferkit-s3", "AWS_SECRET_ACCESS_KEY") in mounted
        else:
            assert "transferkit-s3" not in secrets
        # Every step may record its own failure on the pipeline run's MLflow run.
        assert ("transferkit-mlflow", "MLFLOW_TRACKING_PASSWORD") in mounted
    text = out.read_text()
    for value in CREDENTIALS.values():
        assert value not in text
    # The baked-in run parameter holds the configuration, not the cluster wiring.
    spec, _ = parse(out)
    for name, parameter in spec.root.input_definitions.parameters.items():
        if name.endswith("_config"):
            default = json_format.MessageToDict(parameter.default_value)
            assert "kubernetes" not in default, name
            assert "resources" not in default, name


def test_every_step_can_record_its_failure_on_the_pipeline_runs_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod's pipeline run id and step from its labels, the tracking server (its credentials
    come from the MLflow Secret); tests/integration/test_step_failures.py records a failure
    through them."""
    out, executors, kube = compile_config(
        tmp_path,
        monkeypatch,
        "registry.tracking_uri=http://mlflow.example:5000",
    )
    assert len(executors) == 8
    for name, executor in executors.items():
        fields = {f["name"]: f["fieldPath"] for f in kube[name]["fieldPathAsEnv"]}
        assert fields["TRANSFERKIT_PIPELINE_RUN_ID"] == "metadata.labels['pipeline/runid']"
        assert fields["TRANSFERKIT_STEP"] == "metadata.labels['transferkit.dev/step']"
        assert kube[name]["podMetadata"]["labels"]["transferkit.dev/step"] == (
            step_of(name).replace("-", "_")
        )
        env = {e["name"]: e["value"] for e in executor["container"]["env"]}
        assert env["TRANSFERKIT_TRACKING_URI"] == "http://mlflow.example:5000"
        assert env["TRANSFERKIT_EXPERIMENT"] == "transferkit"
    assert all(value not in out.read_text() for value in CREDENTIALS.values())
    # A local SQLite store is not reachable from pods: no tracking environment.
    _, executors, kube = compile_config(
        tmp_path, monkeypatch, config=ROOT / "examples" / "sst2-finetune.yaml"
    )
    for name, executor in executors.items():
        assert "TRANSFERKIT_TRACKING_URI" not in str(executor["container"].get("env", []))
        assert len(kube[name]["fieldPathAsEnv"]) == 2


def test_no_step_has_a_kfp_retry_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KFP would rerun a step after bad input too; transient errors are retried in the step."""
    out, _, _ = compile_config(tmp_path, monkeypatch)
    spec, _ = parse(out)
    assert spec.root.dag.tasks
    for task in spec.root.dag.tasks.values():
        assert not task.HasField("retry_policy")
        assert task.retry_policy.max_retry_count == 0


def test_a_cpu_config_keeps_training_in_the_cpu_image_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, executors, kube = compile_config(
        tmp_path, monkeypatch, config=ROOT / "examples" / "sst2-finetune.yaml"
    )
    assert executors["exec-train"]["container"]["image"] == CPU_IMAGE
    assert "accelerator" not in executors["exec-train"]["container"]["resources"]
    assert all("secretAsEnv" not in entry for entry in kube.values())


def test_a_gpu_sweep_trains_every_branch_on_the_gpu_node_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = "{type: nvidia.com/gpu, count: 2}"
    _, executors, kube = compile_config(
        tmp_path,
        monkeypatch,
        f"resources.train.accelerator={gpu}",
        "resources.train.node_selector={pool: gpu}",
        config=ROOT / "examples" / "sst2-strategies.yaml",
    )
    assert executors["exec-train"]["container"]["image"] == CUDA_IMAGE
    assert executors["exec-train"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    assert kube["exec-train"]["nodeSelector"]["labels"] == {"pool": "gpu"}
    others = {n for n in executors if n != "exec-train"}
    assert {"exec-plan-sweep", "exec-compare-strategies"} <= others
    for name in others:
        assert executors[name]["container"]["image"] == CPU_IMAGE
        assert "nodeSelector" not in kube.get(name, {})


def test_several_nodes_make_training_a_light_train_job_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, executors, kube = compile_config(tmp_path, monkeypatch, "training.nodes=2")
    assert "exec-train" not in executors
    train = executors["exec-train-nodes"]["container"]
    # The launcher runs the TrainJob step in the CPU image, without the GPU or the node pool:
    # the TrainJob's nodes get those (tests/unit/test_trainjob.py).
    assert train["image"] == CPU_IMAGE
    assert "transferkit.training.trainjob import run_train_job" in " ".join(train["command"])
    assert "accelerator" not in train["resources"]
    assert train["resources"]["resourceMemoryLimit"] == "2Gi"
    placement = kube["exec-train-nodes"]
    assert "nodeSelector" not in placement
    assert "tolerations" not in placement
    fields = {f["name"]: f["fieldPath"] for f in placement["fieldPathAsEnv"]}
    assert fields == {
        "POD_NAME": "metadata.name",
        "POD_UID": "metadata.uid",
        "POD_NAMESPACE": "metadata.namespace",
        **STEP_FIELDS,
    }
    assert {s["secretName"] for s in placement["secretAsEnv"]} == {
        "transferkit-s3",
        "transferkit-mlflow",
    }
    text = out.read_text()
    assert all(value not in text for value in CREDENTIALS.values())


def test_the_backbone_cache_pvc_is_mounted_on_fetch_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, executors, kube = compile_config(
        tmp_path, monkeypatch, "kubernetes.backbone_cache_pvc=transferkit-backbone-cache"
    )
    fetch = kube["exec-fetch-backbone"]["pvcMount"]
    assert fetch == [
        {
            "constant": "transferkit-backbone-cache",
            "pvcNameParameter": {"runtimeValue": {"constant": "transferkit-backbone-cache"}},
            "mountPath": "/var/cache/transferkit/backbones",
        }
    ]
    env = executors["exec-fetch-backbone"]["container"]["env"]
    assert {
        "name": "TRANSFERKIT_BACKBONE_CACHE",
        "value": "/var/cache/transferkit/backbones",
    } in env
    assert all("pvcMount" not in kube.get(n, {}) for n in executors if n != "exec-fetch-backbone")
