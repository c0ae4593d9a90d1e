"""Images as a modality: what a vision backbone is fed, and running a module over images.

Input adaptation (resize, grey → 3 channels, normalisation) is explicit: the backbone records
what it expects (``ImageInput``), the config may override it, and ``prepare`` applies it to
uint8 images [N, H, W, C] in one place, for feature extraction, training and serving alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from transferkit.backbones.text import autocast
from transferkit.progress import progress

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageInput(BaseModel):
    """What a vision backbone is fed: square size, channels, per-channel mean and std."""

    size: int
    channels: int
    mean: list[float]
    std: list[float]
    flip_average: bool = False  # outputs averaged over the image and its mirror (inference)


def prepare(images: np.ndarray, spec: ImageInput) -> torch.Tensor:
    """uint8 images [N, H, W, C] → normalised float tensor [N, spec.channels, size, size].

    Grey images are repeated to 3 channels when the backbone takes 3 (and RGB averaged to
    grey for a 1-channel backbone); resizing is bilinear with antialiasing.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] != spec.channels:
        x = x.mean(dim=1, keepdim=True)
        if spec.channels != 1:
            x = x.expand(-1, spec.channels, -1, -1)
    if x.shape[-1] != spec.size or x.shape[-2] != spec.size:
        x = nn.functional.interpolate(
            x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def image_batches(count: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``count`` rows."""
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


@torch.inference_mode()
def run_images(
    module: nn.Module,
    images: np.ndarray,
    spec: ImageInput,
    batch_size: int = 256,
    precision: str = "fp32",
    description: str = "encode",
) -> np.ndarray:
    """Apply ``module(pixels) → [batch, width]`` to uint8 images [N, H, W, C], in order;
    with ``spec.flip_average``, the mean of the outputs of each image and its mirror."""
    device = next(module.parameters()).device
    module.eval()
    chunks = list(image_batches(len(images), batch_size))
    out: list[np.ndarray] = []
    with autocast(precision, device):
        for part in progress(chunks, len(chunks), description):
            pixels = prepare(images[part], spec).to(device)
            outputs = module(pixels).float()
            if spec.flip_average:
                outputs = (outputs + module(pixels.flip(-1)).float()) / 2
            out.append(outputs.cpu().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
