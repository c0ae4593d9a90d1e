"""Resumable training: the fine-tuning loop's whole state, saved every N steps to a folder of
the artifact store (``training.checkpoint_every_steps``, ``training.checkpoint_uri``).

A checkpoint is keyed by what determines the training — the config without its runtime,
registry and cluster sections, the data fingerprint and the backbone fingerprint — so a rerun
of the same config on the same data resumes, and anything else starts afresh. It is one
``checkpoint.pt`` (tensors and plain values only, read back with ``weights_only=True``)
written by a single PUT or an atomic rename, so a reader never sees half of one. It is
deleted when training ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from transferkit import storage
from transferkit.config import PipelineConfig, StorageConfig

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Sections that do not change what is trained.
_NOT_TRAINING = ("runtime", "registry", "resources", "kubernetes", "trigger", "sweep")


class Checkpoints:
    """Where one training's checkpoint lives, and how often it is written."""

    def __init__(self, uri: str, every: int, storage_config: StorageConfig | None) -> None:
        self.uri = uri
        self.every = every
        self.storage = storage_config

    @classmethod
    def for_training(
        cls, config: PipelineConfig, data_fingerprint: str, backbone_fingerprint: str
    ) -> Checkpoints | None:
        """The checkpoints of ``config`` on this data and backbone; None when off."""
        every = config.training.checkpoint_every_steps
        if not every:
            return None
        what = config.as_parameter()
        for section in _NOT_TRAINING:
            what.pop(section, None)
        for field in ("checkpoint_every_steps", "checkpoint_uri"):
            what["training"].pop(field, None)
        what["data_fingerprint"] = data_fingerprint
        what["backbone_fingerprint"] = backbone_fingerprint
        key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
        base = config.training.checkpoint_uri
        if base is None:
            base = str(Path(config.runtime.work_dir).absolute() / "checkpoints")
        return cls(f"{base.rstrip('/')}/{key}/{CHECKPOINT}", every, config.storage)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or one of another format)."""
        if not storage.exists(self.uri, self.storage):
            return None
        with tempfile.TemporaryDirectory(prefix="transferkit-checkpoint-") as scratch:
            path = storage.fetch_file(self.uri, Path(scratch), self.storage)
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT:
            log.warning("ignoring checkpoint %s of another format", self.uri)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="transferkit-checkpoint-") as scratch:
            path = Path(scratch) / CHECKPOINT
            torch.save({**state, "format": FORMAT}, path)
            storage.upload_file(path, self.uri, self.storage)
        log.info("checkpoint at step %d: %s", state["step"], self.uri)

    def clear(self) -> None:
        storage.delete_file(self.uri, self.storage)
