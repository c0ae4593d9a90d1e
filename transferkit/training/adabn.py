"""Domain adaptation for vision backbones: AdaBN (Li et al. 2016).

A network trained on one image domain normalises every layer with that domain's batch
statistics. AdaBN keeps every weight and re-estimates the BatchNorm running mean and variance
on images of the target domain (no labels needed), so the features of grey 28×28 X-rays are
normalised as the CIFAR photographs were. The adapted backbone is written as a new backbone
folder (new fingerprint), and any strategy runs on top of it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit import storage
from transferkit.backbones.base import folder_family
from transferkit.backbones.fetch import BackboneInfo
from transferkit.backbones.images import ImageInput, prepare
from transferkit.errors import TrainingError

log = logging.getLogger(__name__)


@torch.no_grad()
def recompute_batch_norm(
    encoder: nn.Module,
    images: np.ndarray,
    spec: ImageInput,
    batch_size: int,
    before: list[torch.Tensor] | None = None,
) -> int:
    """Replace every BatchNorm layer's running statistics by those of ``images``.

    Statistics are averaged over equal-sized batches (momentum None), in fp32; every other
    layer is in eval mode.

    Returns:
        The number of BatchNorm layers re-estimated.

    Raises:
        TrainingError: the backbone has no BatchNorm layers (AdaBN would change nothing).
    """
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise TrainingError(
            "domain_adaptation (AdaBN) re-estimates BatchNorm statistics, but the backbone has "
            "no BatchNorm layers; use another strategy"
        )
    if before is not None:  # the first layer's statistics as they were
        before.append(torch.as_tensor(norms[0].running_mean).clone())
    device = next(encoder.parameters()).device
    encoder.eval()
    saved = [(m.momentum, m.training) for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average: every batch weighs the same
        module.train()
    try:
        # Equal batches: the cumulative average then weighs every image the same, so the
        # first layer's mean is exactly the target images' mean.
        for part in np.array_split(np.arange(len(images)), -(-len(images) // batch_size)):
            encoder(prepare(images[part], spec).to(device))
    finally:
        for module, (momentum, training) in zip(norms, saved, strict=True):
            module.momentum = momentum
            module.train(training)
    encoder.eval()
    return len(norms)


def adapt_batch_norm(
    images: np.ndarray,
    backbone_dir: Path,
    info: BackboneInfo,
    output_dir: Path,
    batch_size: int,
    target: torch.device,
) -> dict[str, Any]:
    """AdaBN: write ``backbone_dir`` with BatchNorm statistics of ``images`` to ``output_dir``.

    Returns:
        What was done, for ``training.json``: layers, images, seconds and how far the first
        layer's statistics moved.
    """
    spec = info.image
    assert spec, "AdaBN adapts image backbones only (backbones.support refuses the rest)"
    started = time.perf_counter()
    family = folder_family(backbone_dir / "model", info.family)
    _, encoder = family.load(backbone_dir / "model", info.modality, info)
    encoder.to(target)
    layers = recompute_batch_norm(encoder, images, spec, batch_size, before := list[torch.Tensor]())
    first = next(m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    shift = float((torch.as_tensor(first.running_mean) - before[0]).abs().mean())
    with storage.atomic_dir(output_dir) as tmp:
        model_dir = tmp / "model"
        family.save(encoder.cpu(), None, backbone_dir / "model", model_dir)
        hashes = {
            p.relative_to(model_dir).as_posix(): storage.sha256_file(p)
            for p in sorted(model_dir.rglob("*.safetensors"))
        }
        adapted = info.model_copy(
            update={
                "source": f"{info.source} (AdaBN on {len(images):,} target images)",
                "weights": hashes,
                "fingerprint": storage.sha256_tree(model_dir, known=hashes),
            }
        )
        storage.write_json(tmp / "backbone.json", adapted.model_dump())
    record = {
        "method": "adabn",
        "batch_norm_layers": layers,
        "images": len(images),
        "first_layer_mean_shift": round(shift, 5),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "AdaBN: %d BatchNorm layers re-estimated on %s target images", layers, f"{len(images):,}"
    )
    return record
