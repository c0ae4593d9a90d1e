"""A stand-in for the Kubernetes API server, serving Kubeflow Trainer TrainJobs over HTTP.

stand-in: no Kubernetes cluster can run here. This is a named stand-in, not the real server:
a ``ThreadingHTTPServer`` on 127.0.0.1 that answers the REST paths of one custom resource,
``/apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs[/<name>]``, the way the API
server does, so the launcher's real ``kubernetes`` client (loaded from a kubeconfig that
``write_kubeconfig`` writes) talks to it unchanged:

- a bearer token other than the stand-in's is a 401; a verb the ServiceAccount is not granted
  (``KubeApiStandIn.verbs``, by default those of manifests/base/rbac.yaml) is a 403;
- create answers 201 with the stored object (uid, resourceVersion, creationTimestamp added),
  409 AlreadyExists for a name taken, 400 for a namespace other than the path's, and 422
  Invalid for a wrong apiVersion or kind, a missing or malformed name, or a spec the Trainer's
  own API models (kubeflow-trainer-api) cannot read. The real server would prune unknown
  fields with a warning; the stand-in refuses them, since a field silently dropped is a bug;
- get answers the object or 404 NotFound (Status objects as the server writes them); list
  and delete are served too (the launcher uses neither); watch, patch and update are not.

What the Trainer controller would do is scripted: ``script`` gives the statuses the job shows
on its successive GETs (or ``GONE``: deleted), or a ``controller`` (an object with the
launcher's ``create``/``get``, e.g. ``StandInTrainJobs``, which runs the nodes as local
processes) is told of each created job and asked for its status. Every request is recorded
(method, path, query, headers, body) for asserts.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from tests.stand_ins.http import loopback, send_json
from tests.stand_ins.trainjobs import parse_strictly

# Spelt out here rather than imported from the code under test, so a wrong path there fails.
GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RESOURCE = f"{PLURAL}.{GROUP}"
GONE = "gone"  # a script step: the job is deleted (404 from that GET on)
ROOT = Path(__file__).resolve().parents[2]
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
PATH = re.compile(
    rf"/apis/{re.escape(GROUP)}/{VERSION}/namespaces/(?P<ns>[^/]+)/{PLURAL}(?:/(?P<name>[^/]+))?"
)


def rbac_verbs() -> set[str]:
    """The verbs manifests/base/rbac.yaml grants the pipeline's ServiceAccount on trainjobs."""
    verbs: set[str] = set()
    for doc in yaml.safe_load_all((ROOT / "manifests" / "base" / "rbac.yaml").read_text()):
        for rule in (doc or {}).get("rules", []):
            if GROUP in rule.get("apiGroups", []) and PLURAL in rule.get("resources", []):
                verbs |= set(rule.get("verbs", []))
    return verbs


def conditions(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    """A TrainJob status with one true condition (``Created``, ``Complete``, ``Failed`` …)."""
    condition = {"type": kind, "status": "True", "reason": reason, "message": message}
    return {"conditions": [{k: v for k, v in condition.items() if v}]}


class Controller(Protocol):
    """What stands in for the Trainer controller: told of each job, asked for its status."""

    def create(self, namespace: str, body: dict[str, Any]) -> None: ...

    def get(self, namespace: str, name: str) -> dict[str, Any]: ...


@dataclass
class Recorded:
    """One request as the stand-in received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case, as HTTP/2 writes them
    body: Any
    code: int = 0  # the status answered


@dataclass
class KubeApiStandIn:
    """State of the stand-in API server: objects, scripts, grants and recorded requests."""

    url: str = ""
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    user: str = "system:serviceaccount:transferkit:transferkit-pipeline-runner"
    verbs: set[str] = field(default_factory=rbac_verbs)  # granted on trainjobs
    controller: Controller | None = None
    installed: bool = True  # False: no Trainer CRDs, every trainjobs path is a 404
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    scripts: dict[tuple[str, str], list[dict[str, Any] | str]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, namespace: str, name: str, *steps: dict[str, Any] | str) -> None:
        """The job's status on its successive GETs (the last one stays), or ``GONE``."""
        self.scripts[(namespace, name)] = list(steps)

    def put(self, body: dict[str, Any]) -> None:
        """Store a job as if someone had created it before (no request recorded)."""
        meta = body["metadata"]
        self.objects[(meta["namespace"], meta["name"])] = _stored(body)

    def sent(self, method: str) -> list[Recorded]:
        """The recorded requests of one method."""
        return [r for r in self.requests if r.method == method]


def _stored(body: dict[str, Any]) -> dict[str, Any]:
    job = json.loads(json.dumps(body))
    job["metadata"].update(
        uid=str(uuid.uuid4()),
        resourceVersion="1",
        generation=1,
        creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return job


def status_object(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """A ``Status`` as the API server writes it for a failed request."""
    found: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        found["details"] = details
    return found


def _invalid(name: str, causes: list[tuple[str, str]]) -> dict[str, Any]:
    text = ", ".join(f"{where}: {what}" for where, what in causes)
    return status_object(
        422,
        "Invalid",
        f'{KIND}.{GROUP} "{name}" is invalid: {text}',
        name=name,
        group=GROUP,
        kind=KIND,
        causes=[
            {"reason": "FieldValueInvalid", "message": what, "field": where}
            for where, what in causes
        ],
    )


def _validate(body: Any, namespace: str) -> dict[str, Any] | None:
    """The error Status the API server would answer a create of ``body`` with, or None."""
    if not isinstance(body, dict):
        return status_object(400, "BadRequest", "the body is not a JSON object")
    meta = body.get("metadata") or {}
    name = meta.get("name", "")
    causes = []
    if body.get("apiVersion") != f"{GROUP}/{VERSION}":
        causes.append(("apiVersion", f"Invalid value: {body.get('apiVersion')!r}"))
    if body.get("kind") != KIND:
        causes.append(("kind", f"Invalid value: {body.get('kind')!r}"))
    if not name:
        causes.append(("metadata.name", "Required value: name or generateName is required"))
    elif len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        causes.append(("metadata.name", f"Invalid value: {name!r}: not a DNS-1123 subdomain"))
    if causes:
        return _invalid(name, causes)
    if meta.get("namespace", namespace) != namespace:
        return status_object(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
        )
    try:
        job = parse_strictly(body)
    except ValueError as exc:
        return _invalid(name, [("spec", str(exc).splitlines()[0])])
    if job.spec is None or job.spec.runtime_ref is None:
        return _invalid(name, [("spec.runtimeRef", "Required value")])
    return None


def _handler(state: KubeApiStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict[str, Any]) -> None:
            send_json(self, code, body)

        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            query = parse_qs(url.query)
            headers = {k.lower(): v for k, v in self.headers.items()}
            with state.lock:
                recorded = Recorded(method, url.path, query, headers, body)
                state.requests.append(recorded)
                code, answer = self._answer(method, url.path, query, body)
                recorded.code = code
            self._send(code, answer)

        def _answer(
            self, method: str, path: str, query: dict[str, list[str]], body: Any
        ) -> tuple[int, dict[str, Any]]:
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                return 401, status_object(401, "Unauthorized", "Unauthorized")
            route = PATH.fullmatch(path)
            if route is None or not state.installed:
                message = "the server could not find the requested resource"
                return 404, status_object(404, "NotFound", message)
            namespace, name = route["ns"], route["name"]
            verb = {
                ("POST", False): "create",
                ("GET", True): "get",
                ("GET", False): "watch" if query.get("watch") == ["true"] else "list",
                ("DELETE", True): "delete",
                ("PATCH", True): "patch",
                ("PUT", True): "update",
            }.get((method, name is not None))
            if verb is None:
                return 405, status_object(405, "MethodNotAllowed", f"{method} is not supported")
            if verb not in state.verbs:
                what = f'{RESOURCE} "{name}"' if name else RESOURCE
                message = (
                    f'{what} is forbidden: User "{state.user}" cannot {verb} resource '
                    f'"{PLURAL}" in API group "{GROUP}" in the namespace "{namespace}"'
                )
                named = {"name": name} if name else {}
                return 403, status_object(403, "Forbidden", message, **named, kind=PLURAL)
            if verb == "create":
                return self._create(namespace, body)
            if verb == "watch":
                return 405, status_object(405, "MethodNotAllowed", "the stand-in has no watch")
            if verb == "list":
                items = [job for (ns, _), job in state.objects.items() if ns == namespace]
                listed = {"apiVersion": f"{GROUP}/{VERSION}", "kind": f"{KIND}List"}
                return 200, {**listed, "metadata": {"resourceVersion": "1"}, "items": items}
            assert name is not None
            key = (namespace, name)
            if verb == "get" and key in state.objects:
                self._advance(key)
            if key not in state.objects:
                message = f'{RESOURCE} "{name}" not found'
                return 404, status_object(404, "NotFound", message, name=name, kind=PLURAL)
            if verb == "delete":
                return 200, state.objects.pop(key)  # custom resources answer the object
            if verb in ("patch", "update"):
                return 405, status_object(405, "MethodNotAllowed", f"the stand-in has no {verb}")
            return 200, state.objects[key]

        def _create(self, namespace: str, body: Any) -> tuple[int, dict[str, Any]]:
            refused = _validate(body, namespace)
            if refused is not None:
                return refused["code"], refused
            name = body["metadata"]["name"]
            if (namespace, name) in state.objects:
                message = f'{RESOURCE} "{name}" already exists'
                return 409, status_object(409, "AlreadyExists", message, name=name, kind=PLURAL)
            job = _stored({**body, "metadata": {**body["metadata"], "namespace": namespace}})
            if state.controller is not None:
                state.controller.create(namespace, body)
            state.objects[(namespace, name)] = job
            return 201, job

        def _advance(self, key: tuple[str, str]) -> None:
            """What the controller did since the last GET."""
            steps = state.scripts.get(key)
            if steps:
                step = steps.pop(0) if len(steps) > 1 else steps[0]
                if step == GONE:
                    state.objects.pop(key)
                else:
                    assert isinstance(step, dict)
                    state.objects[key]["status"] = step
            elif state.controller is not None:
                found = state.controller.get(*key)
                state.objects[key]["status"] = found.get("status", {})

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def do_PATCH(self) -> None:
            self._serve("PATCH")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def log_message(self, *args: Any) -> None:  # quiet test output
            pass

    return Handler


@contextmanager
def serve_kube_api(state: KubeApiStandIn | None = None) -> Iterator[KubeApiStandIn]:
    """Run the stand-in on a free loopback port for the ``with`` block."""
    state = state or KubeApiStandIn()
    with loopback(_handler(state)) as url:
        state.url = url
        yield state


def write_kubeconfig(path: Path, server: str, token: str, namespace: str = "default") -> Path:
    """A kubeconfig with one context: ``server`` reached with bearer ``token``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stand-in", "cluster": {"server": server}}],
        "users": [{"name": "launcher", "user": {"token": token}}],
        "contexts": [
            {
                "name": "stand-in",
                "context": {"cluster": "stand-in", "user": "launcher", "namespace": namespace},
            }
        ],
        "current-context": "stand-in",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def use_kubeconfig(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make ``path`` the kubeconfig the ``kubernetes`` package loads, as a launcher run
    outside a cluster with $KUBECONFIG set would: never in-cluster credentials (a test run
    inside a pod must not reach its real cluster)."""
    from kubernetes.config import kube_config

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The package reads $KUBECONFIG once, when it is imported: tell it again.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
