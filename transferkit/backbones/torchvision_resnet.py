"""torchvision's ImageNet ResNets (resnet18 … resnet152) as Hugging Face ResNet folders.

A torchvision checkpoint is a bare state dict (``conv1``, ``bn1``, ``layer1.0.conv1`` …,
``downsample.0/1``, ``fc``). Hugging Face's ``ResNetModel`` is the same network — 7×7 stem and
max pool, basic or bottleneck layers with the stride on the 3×3 convolution (ResNet v1.5), a
1×1 convolution + batch norm shortcut where the shape changes — under other names. ``convert``
renames the tensors, checks every name and shape against the architecture, and returns the
folder's ``config.json``, tensors and ``preprocessor_config.json``; the vision family then
loads it like any Hugging Face ResNet. The source task's classifier (``fc``) is dropped:
transfer replaces it.

torchvision itself is not needed (nor imported): its layout is fixed by the names below.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from transferkit.backbones.images import IMAGENET_MEAN, IMAGENET_STD
from transferkit.backbones.resnet_cifar import check_tensors
from transferkit.errors import BackboneError

# name → (layer type, layers per stage), as torchvision.models.resnet builds them.
ARCHITECTURES: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
WIDTHS = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}
CLASSIFIER = ("fc.weight", "fc.bias")
# torchvision's evaluation transform: resize the short side to 256, centre-crop 224 (the
# ConvNeXt processor's shortest_edge 224 with crop_pct 0.875), bilinear, ImageNet statistics.
PREPROCESSOR: dict[str, Any] = {
    "image_processor_type": "ConvNextImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "crop_pct": 0.875,
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}

_HF_NAMES = (
    (re.compile(r"^embedder\.embedder\.convolution\.(.+)$"), r"conv1.\1"),
    (re.compile(r"^embedder\.embedder\.normalization\.(.+)$"), r"bn1.\1"),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.(.+)$"),
        "layer{s}.{b}.conv{k}.{rest}",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.(.+)$"),
        "layer{s}.{b}.bn{k}.{rest}",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(.+)$"),
        "layer{s}.{b}.downsample.0.{rest}",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(.+)$"),
        "layer{s}.{b}.downsample.1.{rest}",
    ),
)


def torchvision_name(hf_name: str) -> str:
    """The torchvision key of a Hugging Face ``ResNetModel`` key."""
    for pattern, template in _HF_NAMES:
        match = pattern.match(hf_name)
        if not match:
            continue
        groups = match.groups()
        if template.startswith(("conv1", "bn1")):
            return pattern.sub(template, hf_name)
        stage, block = int(groups[0]) + 1, groups[1]
        if len(groups) == 4:
            return template.format(s=stage, b=block, k=int(groups[2]) + 1, rest=groups[3])
        return template.format(s=stage, b=block, rest=groups[2])
    raise ValueError(f"not a ResNetModel key: {hf_name}")


def _known() -> str:
    return ", ".join(ARCHITECTURES)


def resnet_config(architecture: str) -> dict[str, Any]:
    """``config.json`` of the Hugging Face ResNet equivalent to a torchvision one."""
    from transformers import ResNetConfig

    layer_type, depths = ARCHITECTURES[architecture]
    config = ResNetConfig(
        num_channels=3,
        embedding_size=64,
        hidden_sizes=WIDTHS[layer_type],
        depths=list(depths),
        layer_type=layer_type,
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,  # v1.5: the stride on the 3×3 convolution
        architectures=["ResNetModel"],
    )
    return {**config.to_dict(), "torchvision_architecture": architecture}


def _expected(config: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """torchvision key → (Hugging Face key, shape) of every tensor the model holds."""
    from transformers import ResNetConfig, ResNetModel

    with torch.device("meta"):
        model = ResNetModel(ResNetConfig(**config))
    return {
        torchvision_name(name): (name, tuple(tensor.shape))
        for name, tensor in model.state_dict().items()
    }


def layout_of(state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet a state dict looks like (by its layer counts), ``"resnet"`` for
    a torchvision-style ResNet of no known depth, or None when it is not one (a CIFAR ResNet
    has three stages and ``linear``; torchvision's have ``layer4`` and ``fc``)."""
    if not any(k.startswith(("layer4.", "fc.")) for k in state):
        return None
    layer_type = "bottleneck" if any(".conv3." in k for k in state) else "basic"
    depths = tuple(
        1 + max((int(k.split(".")[1]) for k in state if k.startswith(f"layer{s}.")), default=-1)
        for s in range(1, 5)
    )
    for name, known in ARCHITECTURES.items():
        if known == (layer_type, depths):
            return name
    return "resnet"


def convert(
    state: dict[str, torch.Tensor], architecture: str, source: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """A torchvision ResNet state dict → a Hugging Face ``ResNetModel`` folder's contents.

    Args:
        state: the checkpoint's tensors (a ``module.`` prefix already removed).
        architecture: torchvision's name for it: resnet18, resnet34, resnet50, resnet101,
            resnet152.
        source: where the checkpoint came from, for messages.

    Returns:
        ``config.json`` (a dict), the renamed tensors (``fc`` dropped; a missing
        ``num_batches_tracked`` filled with 0), and ``preprocessor_config.json``.

    Raises:
        BackboneError: an unknown architecture, or tensors that are not that architecture's
            (the first missing, unexpected or misshapen key named).
    """
    if architecture not in ARCHITECTURES:
        raise BackboneError(
            f"{source}: backbone.architecture '{architecture}' is not a torchvision ResNet "
            f"transferkit converts; use one of {_known()}"
        )
    config = resnet_config(architecture)
    expected = _expected(config)
    hint = (
        f"set backbone.architecture to the checkpoint's own (one of {_known()}; ResNeXt and "
        "wide ResNets are not supported), or unset it for a CIFAR ResNet state dict"
    )
    shapes = {k: shape for k, (_, shape) in expected.items()}
    check_tensors(state, shapes, f"torchvision {architecture}", source, hint, CLASSIFIER)
    tensors: dict[str, torch.Tensor] = {}
    for key, (hf_name, _) in expected.items():
        tensor = state.get(key)
        # num_batches_tracked: absent from old checkpoints, unused in evaluation.
        tensors[hf_name] = (
            torch.zeros((), dtype=torch.long) if tensor is None else tensor.contiguous()
        )
    return config, tensors, dict(PREPROCESSOR)
