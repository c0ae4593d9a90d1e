"""A stand-in for the Kubernetes API and the Kubeflow Trainer controller, for TrainJobs only.

No cluster can run here, so this is a named stand-in, not the real thing. ``create`` parses
the TrainJob strictly with the Trainer's own API models (kubeflow-trainer-api, generated from
its OpenAPI schema: a field the schema does not know fails the round trip), then does what
the stock ``torch-distributed`` runtime does with it: starts ``numNodes`` processes running
the trainer's command and args, each with the PET_* variables the runtime sets (all on
127.0.0.1, gloo on the CPU). ``get`` reports the job Complete when every node exited 0, and
Failed (with the first failing node's last stderr line) otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob


def parse_strictly(body: dict[str, Any]) -> TrainerV1alpha1TrainJob:
    """The TrainJob as the Trainer's API models read it; unknown or mistyped fields fail."""
    job = TrainerV1alpha1TrainJob.from_dict(body)
    assert job is not None
    again = job.to_dict()
    if again != body:
        raise ValueError(f"TrainJob does not round-trip through its schema: {again} != {body}")
    return job


@dataclass
class StandInTrainJobs:
    """Records created jobs and runs their nodes as local processes."""

    env: dict[str, str] = field(default_factory=dict)  # extra environment of every node
    created: list[dict[str, Any]] = field(default_factory=list)
    nodes: dict[str, list[subprocess.Popen[str]]] = field(default_factory=dict)
    # Each node's stderr, in a file: a pipe nobody reads while the node runs fills up (64 KiB
    # of log lines) and blocks the node for good.
    stderr: dict[str, list[IO[str]]] = field(default_factory=dict)
    polls: int = 0

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        job = parse_strictly(body)
        assert job.metadata is not None
        assert job.metadata.namespace == namespace
        assert job.spec is not None
        assert job.spec.trainer is not None
        trainer = job.spec.trainer
        self.created.append(body)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        count = trainer.num_nodes or 1
        command = [sys.executable if c == "python" else c for c in trainer.command or []]
        processes: list[subprocess.Popen[str]] = []
        logs: list[IO[str]] = []
        for rank in range(count):
            env = {
                **os.environ,
                **self.env,
                "PET_NNODES": str(count),
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port),
                "PET_NPROC_PER_NODE": str(trainer.num_proc_per_node or 1),
            }
            for var in trainer.env or []:
                if var.value is not None:
                    env[var.name] = var.value
            logs.append(tempfile.TemporaryFile("w+"))  # noqa: SIM115 (outlives this call)
            processes.append(
                subprocess.Popen(
                    [*command, *(trainer.args or [])],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=logs[-1],
                    text=True,
                )
            )
        self.nodes[job.metadata.name or ""] = processes
        self.stderr[job.metadata.name or ""] = logs

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        self.polls += 1
        processes = self.nodes[name]
        if any(p.poll() is None for p in processes):
            return {"status": {"conditions": [{"type": "Created", "status": "True"}]}}
        failed = [
            (p, log)
            for p, log in zip(processes, self.stderr[name], strict=True)
            if p.returncode != 0
        ]
        if failed:
            process, log = failed[0]
            log.seek(0)
            tail = log.read().strip().splitlines()
            message = tail[-1] if tail else f"exit {process.returncode}"
            condition = {"type": "Failed", "status": "True", "reason": "TrainerFailed"}
            return {"status": {"conditions": [{**condition, "message": message}]}}
        return {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
