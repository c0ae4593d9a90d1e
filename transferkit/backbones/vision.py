"""Image encoders: the CIFAR ResNet family, Hugging Face vision models, and input adaptation.

A vision backbone is stored like a text one — a folder with ``config.json`` and
``model.safetensors`` — so fetching, fingerprinting and caching treat both alike. Two kinds:

- ``resnet_cifar``: the 3-stage CIFAR ResNet of He et al. 2016 (16/32/64 channels, n basic
  blocks per stage, option-A shortcuts: stride-2 subsampling plus zero-padded channels), the
  architecture of the ResNet-20 CIFAR-10 checkpoint. Its layer names match that checkpoint's
  keys (``conv1``, ``bn1``, ``layer1.0.conv1`` …, ``linear``), so it loads without renaming.
- ``hf``: any Hugging Face vision model folder (``AutoModel``), with the size, mean and std of
  its image processor.

Input adaptation (resize, grey → 3 channels, normalisation) is explicit: the backbone records
what it expects (``ImageInput``), the config may override it, and ``prepare`` applies it to
uint8 images [N, H, W, C] in one place, for feature extraction, training and serving alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.backbones.fetch import ImageInput
from transferkit.backbones.text import autocast
from transferkit.errors import BackboneError
from transferkit.progress import progress

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_CIFAR = "resnet_cifar"


# --- the CIFAR ResNet -------------------------------------------------------------------------


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by the stride, zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return nn.functional.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity (or option-A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            _ShortcutA(stride, planes - in_planes)
            if stride != 1 or in_planes != planes
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2). ``forward`` returns the pooled 64-d features, not class logits.

    ``linear`` (the source task's classifier) is kept so the checkpoint loads strictly and
    can be inspected; transfer replaces it with a new head and never trains it.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.blocks_per_stage = blocks_per_stage
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        self.linear.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return 64

    def stages(self) -> list[nn.Module]:
        """The blocks bottom to top: stem, then every residual block (for partial freezing)."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, *self.layer1, *self.layer2, *self.layer3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)


def init_resnet_cifar(model: ResNetCifar) -> None:
    """He (Kaiming-normal) initialisation of the convolutions, as the CIFAR ResNet recipe."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight)


def resnet_cifar_config(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """``config.json`` of a CIFAR ResNet, inferred from a state dict's keys and shapes.

    Raises:
        BackboneError: the keys are not those of a CIFAR ResNet.
    """
    needed = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.0.conv1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise BackboneError(
            f"{source}: not a CIFAR ResNet checkpoint (no {missing[0]} among its "
            f"{len(state)} tensors); give a Hugging Face model folder or a resnet_cifar "
            "state dict"
        )
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layer1."))
    classes = int(state["linear.weight"].shape[0]) if "linear.weight" in state else 10
    return {
        "model_type": RESNET_CIFAR,
        "architectures": [f"ResNet{6 * blocks + 2}Cifar"],
        "blocks_per_stage": blocks,
        "num_classes": classes,
        "in_channels": int(state["conv1.weight"].shape[1]),
        "hidden_size": 64,
        "num_hidden_layers": 3 * blocks,
        "image_size": 32,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


# --- encoders ---------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """A vision body: normalised images [B, C, H, W] → feature vectors [B, hidden]."""

    def __init__(self, body: nn.Module, kind: str, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.kind = kind
        self._hidden_size = hidden_size

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def blocks(self) -> list[nn.Module]:
        """Trainable units bottom to top (stem first), for partial fine-tuning."""
        if isinstance(self.body, ResNetCifar):
            return self.body.stages()
        from transferkit.training.strategies import encoder_blocks

        return list(encoder_blocks(self.body))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == RESNET_CIFAR:
            # NHWC: oneDNN's convolutions run ~25% faster on CPU than with NCHW.
            return self.body(pixels.contiguous(memory_format=torch.channels_last)).float()
        out = self.body(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        return pooled.flatten(1).float()


def read_vision_config(model_dir: Path) -> dict[str, Any]:
    """The backbone folder's ``config.json``."""
    return json.loads((model_dir / "config.json").read_text())


def is_vision_folder(model_dir: Path) -> bool:
    """Whether a fetched model folder holds an image backbone."""
    config = read_vision_config(model_dir)
    if config.get("model_type") == RESNET_CIFAR:
        return True
    return (model_dir / "preprocessor_config.json").exists() and not any(
        (model_dir / name).exists() for name in ("tokenizer.json", "vocab.txt", "vocab.json")
    )


def declared_input(model_dir: Path) -> ImageInput:
    """The input a vision backbone expects, from its config or image processor."""
    config = read_vision_config(model_dir)
    if config.get("model_type") == RESNET_CIFAR:
        return ImageInput(
            size=int(config["image_size"]),
            channels=int(config["in_channels"]),
            mean=list(config["image_mean"]),
            std=list(config["image_std"]),
        )
    processor: dict[str, Any] = {}
    path = model_dir / "preprocessor_config.json"
    if path.exists():
        processor = json.loads(path.read_text())
    size = processor.get("crop_size") or processor.get("size") or config.get("image_size") or 224
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    channels = int(config.get("num_channels", 3))
    mean = processor.get("image_mean") or [0.5] * channels
    std = processor.get("image_std") or [0.5] * channels
    return ImageInput(size=int(size), channels=channels, mean=list(mean), std=list(std))


def load_image_encoder(model_dir: Path, random_init: bool = False) -> ImageEncoder:
    """The encoder of a fetched vision backbone (fp32 weights, eval mode).

    Args:
        random_init: the same architecture with fresh weights (the scratch control); draws
            from torch's global generator, so seed it first.
    """
    config = read_vision_config(model_dir)
    if config.get("model_type") == RESNET_CIFAR:
        from safetensors.torch import load_file

        body = ResNetCifar(
            int(config["blocks_per_stage"]),
            int(config.get("num_classes", 10)),
            int(config.get("in_channels", 3)),
        )
        if random_init:
            init_resnet_cifar(body)
        else:
            body.load_state_dict(load_file(str(model_dir / "model.safetensors")))
        body = body.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return ImageEncoder(body, RESNET_CIFAR, body.hidden_size).eval()
    from transformers import AutoConfig, AutoModel

    if random_init:
        hf = AutoModel.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    else:
        hf = AutoModel.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    hidden = getattr(hf.config, "hidden_size", None) or hf.config.hidden_sizes[-1]
    return ImageEncoder(hf, "hf", int(hidden)).eval()


# --- input adaptation -------------------------------------------------------------------------


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
