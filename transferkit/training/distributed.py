"""Data-parallel fine-tuning in one pod: one process per accelerator (torch.distributed DDP).

``finetune_parallel`` starts ``world`` processes (``torch.multiprocessing.spawn``), each with
a private copy of the model on its own device — ``cuda:<rank>`` with NCCL, or the CPU with
gloo (how the tests run it here). Every process walks the same global batches and trains on
its shard of each (``transferkit.training.finetune``); DistributedDataParallel averages the
gradients, so the updates are those of one process seeing the whole batch. The main process
validates, keeps the best checkpoint and hands it back through a file; the caller's model
then holds it, as after single-process training.

BatchNorm statistics come from the main process's shards (DDP broadcasts its buffers before
every forward pass).

Across nodes (a Kubeflow Trainer TrainJob, see ``transferkit.training.node``), every node runs
the same training with its processes ranked after the previous nodes' (``Layout``, from the
PET_* variables the torch runtime sets); at the end the main process broadcasts its best
checkpoint, so every node holds the same model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.multiprocessing.spawn import ProcessException

from transferkit.backbones.modality import Inputs
from transferkit.config import PipelineConfig
from transferkit.errors import TrainingError
from transferkit.training.finetune import FinetuneHistory, Rank, finetune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where this node sits in a multi-node job: the environment the Kubeflow Trainer torch
    runtime gives every node (the variables torchrun reads), or one node by default."""

    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free local port
    processes_per_node: int | None = None  # the runtime's numProcPerNode, when a number

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Layout:
        """From PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT and
        PET_NPROC_PER_NODE in ``env`` (the entry point passes its environment); absent: one
        node.

        Raises:
            TrainingError: the variables are inconsistent.
        """
        if "PET_NNODES" not in env:
            return cls()
        per_node = env.get("PET_NPROC_PER_NODE", "")
        try:
            layout = cls(
                nodes=int(env["PET_NNODES"]),
                node_rank=int(env.get("PET_NODE_RANK", "0")),
                master_addr=env["PET_MASTER_ADDR"],
                master_port=int(env["PET_MASTER_PORT"]),
                processes_per_node=int(per_node) if per_node.isdigit() else None,
            )
        except (KeyError, ValueError) as exc:
            raise TrainingError(
                f"multi-node environment incomplete or invalid ({exc}); the TrainJob's runtime "
                "must set PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT"
            ) from None
        if not 0 <= layout.node_rank < layout.nodes:
            raise TrainingError(
                f"PET_NODE_RANK {layout.node_rank} is outside 0..{layout.nodes - 1}"
            )
        return layout

    @property
    def main(self) -> bool:
        return self.node_rank == 0


def world_size(config: PipelineConfig, layout: Layout | None = None) -> int:
    """Training processes on this node: ``training.processes``, else the multi-node runtime's
    number per node, else one per visible CUDA device (≥ 1)."""
    if config.training.processes:
        return config.training.processes
    if layout is not None and layout.processes_per_node:
        return layout.processes_per_node
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _share_best(model: nn.Module, history: FinetuneHistory | None) -> FinetuneHistory:
    """Every process ends with the main process's best checkpoint and history (multi-node:
    each node saves the same model; the first uploads it)."""
    for tensor in model.state_dict().values():
        torch.distributed.broadcast(tensor, src=0)
    box: list[Any] = [history.model_dump() if history is not None else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return FinetuneHistory.model_validate(box[0])


def _group_names(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimiser groups with parameter names instead of tensors (rebuilt in each process)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "names": [name_of[id(p)] for p in g["params"]],
        }
        for g in groups
    ]


def _worker(
    local_rank: int,
    local_world: int,
    layout: Layout,
    model: nn.Module,
    groups: list[dict[str, Any]],
    job: dict[str, Any],
    out: str,
) -> None:
    """One training process: join the group, train a private copy, the main one saves it.

    The process ends with ``os._exit``: tearing down a gloo process group while its worker
    thread still releases Python tensors deadlocks (the destructor joins that thread while
    holding the GIL, seen as a hung test), so no destructor runs. Errors go to a file.
    """
    config: PipelineConfig = job["config"]
    code = 0
    rank = layout.node_rank * local_world + local_rank
    world = layout.nodes * local_world
    try:
        os.environ["MASTER_ADDR"] = layout.master_addr
        os.environ["MASTER_PORT"] = str(layout.master_port)
        cuda = torch.cuda.is_available()
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", rank=rank, world_size=world
        )
        if cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            threads = config.runtime.num_threads or os.cpu_count() or 1
            torch.set_num_threads(max(threads // local_world, 1))
        if rank:
            logging.getLogger("transferkit").setLevel(logging.WARNING)  # one log: the main one
        torch.manual_seed(config.training.seed + rank)  # dropout masks differ across shards
        # A private copy: spawn hands every process the same shared-memory tensors.
        model = copy.deepcopy(model).to(device)
        named = dict(model.named_parameters())
        rebuilt = [
            {
                **{k: v for k, v in g.items() if k != "names"},
                "params": [named[n] for n in g["names"]],
            }
            for g in groups
        ]
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None
        )
        history = finetune(model, groups=rebuilt, rank=Rank(rank, world), forward=wrapped, **job)
        if layout.nodes > 1:
            history = _share_best(model, history if rank == 0 else None)
        if local_rank == 0:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            torch.save(state, Path(out) / "state.pt")
            (Path(out) / "history.json").write_text(history.model_dump_json())
        torch.distributed.barrier()  # every process is past its last collective
    except BaseException as exc:  # reported through the file: the process ends below
        (Path(out) / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def finetune_parallel(
    model: nn.Module,
    config: PipelineConfig,
    train: Inputs,
    train_labels: np.ndarray,
    validation: Inputs,
    validation_labels: np.ndarray,
    labels: list[str],
    groups: list[dict[str, Any]],
    precision: str,
    world: int,
    layout: Layout | None = None,
    class_weights: np.ndarray | None = None,
) -> FinetuneHistory:
    """``finetune`` in ``world`` data-parallel processes on this node (times ``layout.nodes``
    nodes); ``model`` holds the best checkpoint on return, on the device it came on.

    Raises:
        TrainingError: a process failed (its error is in the message).
    """
    layout = layout or Layout()
    if layout.master_port == 0:
        layout = dataclasses.replace(layout, master_port=_free_port())
    local_world = world
    world = layout.nodes * local_world
    if config.training.batch_size < world:
        raise TrainingError(
            f"training.batch_size {config.training.batch_size} is smaller than the {world} "
            "training processes; raise the batch size (it is split across processes)"
        )
    home = next(model.parameters()).device
    job = {
        "config": config,
        "train": train,
        "train_labels": train_labels,
        "validation": validation,
        "validation_labels": validation_labels,
        "labels": labels,
        "precision": precision,
        "class_weights": class_weights,
    }
    names = _group_names(model, groups)
    log.info(
        "data-parallel fine-tuning: %d processes on %d node(s) (%s), %d examples per process "
        "and step",
        world,
        layout.nodes,
        "NCCL, one GPU each" if torch.cuda.is_available() else "gloo on the CPU",
        config.training.batch_size // world,
    )
    with tempfile.TemporaryDirectory(prefix="transferkit-ddp-") as out:
        try:
            torch.multiprocessing.spawn(
                _worker,
                args=(local_world, layout, model.cpu(), names, job, out),
                nprocs=local_world,
                join=True,
            )
        except ProcessException as exc:
            reports = [p.read_text() for p in sorted(Path(out).glob("error-*.txt"))]
            # The process that failed first names the cause; the others lost their peer.
            first = next((r for r in reports if "Error: " in r and "Connection" not in r), None)
            cause = first or (reports[0] if reports else str(exc).strip().splitlines()[-1])
            raise TrainingError(
                f"a data-parallel training process failed: {cause.splitlines()[0]}"
            ) from exc
        state = torch.load(Path(out) / "state.pt", weights_only=True)
        history = FinetuneHistory.model_validate_json((Path(out) / "history.json").read_text())
    model.load_state_dict(state)
    model.to(home).eval()
    return history
