"""A stand-in for the Kubeflow Pipelines API server: the v2beta1 REST endpoints the KFP client
calls to create experiments, runs and recurring runs. No KFP backend can run here (it needs a
Kubernetes cluster), so this is a named stand-in, not the real server.

It checks what a real server would parse: the pipeline spec strictly into the KFP IR
(``PipelineSpec``) and each executor's Kubernetes config into ``KubernetesExecutorConfig``,
the run parameters against the spec's declared inputs, and the recurring run's cron trigger.
Invalid requests get a 400 with a KFP-style error body; everything is recorded for asserts.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from tests.stand_ins.http import send_json


@dataclass
class KfpStandIn:
    """Recorded state of the stand-in server."""

    host: str = ""
    experiments: dict[str, dict] = field(default_factory=dict)  # id → experiment
    runs: list[dict] = field(default_factory=list)
    recurring_runs: list[dict] = field(default_factory=list)
    refuse_runs: bool = False  # answer every run with a 400, as a server rejecting it would


def _check_spec(body: dict) -> None:
    spec = body["pipeline_spec"]
    # The client sends the IR as {pipeline_spec, platform_spec} or as the IR itself.
    ir = spec.get("pipeline_spec", spec)
    parsed = json_format.ParseDict(
        ir, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False
    )
    platform = spec.get("platform_spec", {})
    for config in (
        platform.get("platforms", {})
        .get("kubernetes", {})
        .get("deploymentSpec", {})
        .get("executors", {})
        .values()
    ):
        json_format.ParseDict(
            config,
            kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
            ignore_unknown_fields=False,
        )
    declared = set(parsed.root.input_definitions.parameters)
    given = set(body.get("runtime_config", {}).get("parameters", {}))
    unknown = given - declared
    if unknown:
        raise ValueError(f"unknown run parameters {sorted(unknown)}")
    required = {
        name
        for name, parameter in parsed.root.input_definitions.parameters.items()
        if not parameter.is_optional and not parameter.HasField("default_value")
    }
    if missing := required - given:
        raise ValueError(f"run parameters without a value: {sorted(missing)}")


def serve() -> tuple[KfpStandIn, ThreadingHTTPServer]:
    """Start the stand-in on a free port of 127.0.0.1 (call ``shutdown()`` when done)."""
    state = KfpStandIn()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: Any) -> None:
            send_json(self, code, body)

        def _error(self, message: str) -> None:
            self._send(400, {"error_message": message, "code": 3, "message": message})

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/apis/v2beta1/healthz":
                return self._send(200, {"multi_user": False})
            if url.path == "/apis/v2beta1/experiments":
                wanted = None
                for raw in parse_qs(url.query).get("filter", []):
                    for predicate in json.loads(raw).get("predicates", []):
                        if predicate.get("key") == "display_name":
                            wanted = predicate.get("stringValue") or predicate.get("string_value")
                found = [
                    e for e in state.experiments.values() if wanted in (None, e["display_name"])
                ]
                return self._send(200, {"experiments": found, "total_size": len(found)})
            if url.path.startswith("/apis/v2beta1/runs/"):
                run_id = url.path.rsplit("/", 1)[-1]
                for run in state.runs:
                    if run["run_id"] == run_id:
                        return self._send(200, run)
                return self._send(404, {"error_message": f"run {run_id} not found", "code": 5})
            return self._send(404, {"error_message": f"no route {url.path}", "code": 5})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            path = urlparse(self.path).path
            if path == "/apis/v2beta1/experiments":
                experiment = {
                    "experiment_id": str(uuid.uuid4()),
                    "display_name": body["display_name"],
                }
                state.experiments[experiment["experiment_id"]] = experiment
                return self._send(200, experiment)
            if path in ("/apis/v2beta1/runs", "/apis/v2beta1/recurringruns"):
                if body.get("experiment_id") not in state.experiments:
                    return self._error(f"experiment {body.get('experiment_id')} not found")
                try:
                    _check_spec(body)
                except (json_format.ParseError, ValueError, KeyError) as exc:
                    return self._error(f"invalid pipeline spec: {exc}")
                if path.endswith("/runs"):
                    if state.refuse_runs:
                        return self._error("quota exceeded in namespace kubeflow")
                    run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING"}
                    state.runs.append(run)
                    return self._send(200, run)
                cron = body.get("trigger", {}).get("cron_schedule", {}).get("cron", "")
                if len(cron.split()) != 6:
                    return self._error(f"invalid cron {cron!r}: KFP expects six fields")
                job = {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
                state.recurring_runs.append(job)
                return self._send(200, job)
            return self._send(404, {"error_message": f"no route {path}", "code": 5})

        def log_message(self, *args: Any) -> None:  # quiet test output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.host = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return state, server
