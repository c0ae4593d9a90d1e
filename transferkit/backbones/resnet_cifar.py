"""The CIFAR ResNet family: the 3-stage ResNet of He et al. 2016 for 32×32 images.

16/32/64 channels, n basic blocks per stage, option-A shortcuts (stride-2 subsampling plus
zero-padded channels): the architecture of the ResNet-20 CIFAR-10 checkpoint. Its layer names
match that checkpoint's keys (``conv1``, ``bn1``, ``layer1.0.conv1`` …, ``linear``), so it
loads without renaming. A bare state-dict file is stored as a folder (``config.json`` +
``model.safetensors``) by fetch_backbone, so fetching, fingerprinting and caching treat it
like any Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit import storage
from transferkit.backbones.base import (
    Capabilities,
    Encoder,
    Family,
    Settings,
    read_config,
    register,
)
from transferkit.backbones.images import IMAGENET_MEAN, IMAGENET_STD, ImageInput
from transferkit.errors import BackboneError

RESNET_CIFAR = "resnet_cifar"


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


def check_tensors(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    what: str,
    source: str,
    hint: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Refuse a state dict whose keys or shapes are not ``expected``'s, in one line naming the
    first unexpected, missing or misshapen key. ``optional`` keys may be present or not;
    BatchNorm's ``num_batches_tracked`` may be absent (old checkpoints lack it, and BatchNorm
    fills it on load).

    Raises:
        BackboneError: the first mismatch, ``what`` the architecture and ``hint`` the fix.
    """
    unexpected = [k for k in state if k not in expected and k not in optional]
    if unexpected:
        raise BackboneError(
            f"{source}: not a {what} state dict: unexpected key {unexpected[0]} (1 of "
            f"{len(unexpected)} that do not fit); {hint}"
        )
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise BackboneError(
            f"{source}: not a {what} state dict: no {missing[0]} (1 of {len(missing)} missing "
            f"keys); {hint}"
        )
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise BackboneError(
                f"{source}: {key} has shape {list(state[key].shape)}, but a {what} has "
                f"{list(shape)}; {hint}"
            )


def resnet_cifar_config(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """``config.json`` of a CIFAR ResNet, inferred from a state dict's keys and shapes.

    Every key and shape is checked against the ResNet the config describes, so a checkpoint
    that is accepted here also loads.

    Raises:
        BackboneError: the keys are not those of a CIFAR ResNet (the first missing,
            unexpected or misshapen one named).
    """
    hint = (
        "give a Hugging Face model folder, a resnet_cifar state dict, or a torchvision "
        "ImageNet ResNet with backbone.architecture set"
    )
    needed = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.0.conv1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise BackboneError(
            f"{source}: not a CIFAR ResNet checkpoint (no {missing[0]} among its "
            f"{len(state)} tensors); {hint}"
        )
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layer1."))
    classes = int(state["linear.weight"].shape[0]) if "linear.weight" in state else 10
    in_channels = int(state["conv1.weight"].shape[1])
    with torch.device("meta"):
        expected = ResNetCifar(blocks, classes, in_channels).state_dict()
    check_tensors(
        state,
        {k: tuple(v.shape) for k, v in expected.items()},
        f"CIFAR ResNet-{6 * blocks + 2}",
        source,
        hint,
    )
    return {
        "model_type": RESNET_CIFAR,
        "architectures": [f"ResNet{6 * blocks + 2}Cifar"],
        "blocks_per_stage": blocks,
        "num_classes": classes,
        "in_channels": in_channels,
        "hidden_size": 64,
        "num_hidden_layers": 3 * blocks,
        "image_size": 32,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


class CifarEncoder(Encoder):
    """The CIFAR ResNet as an encoder: normalised images [B, C, H, W] → 64-d features."""

    body: ResNetCifar

    def __init__(self, body: ResNetCifar) -> None:
        super().__init__()
        self.body = body

    @property
    def hidden_size(self) -> int:
        return 64

    def blocks(self) -> list[nn.Module]:
        assert isinstance(self.body, ResNetCifar)
        return self.body.stages()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # NHWC: oneDNN's convolutions run ~25% faster on CPU than with NCHW.
        return self.body(pixels.contiguous(memory_format=torch.channels_last)).float()


class ResNetCifarFamily(Family):
    """The CIFAR ResNet (He et al. 2016): probe, partial, full, scratch, AdaBN."""

    name = RESNET_CIFAR
    title = "CIFAR ResNet"
    modalities = ("image",)
    priority = 10

    def detect(self, hf_config: dict[str, Any], files: set[str]) -> bool:
        return hf_config.get("model_type") == RESNET_CIFAR

    def capabilities(self, modality: str, hf_config: dict[str, Any]) -> Capabilities:
        return Capabilities(lora=False, adaptation="adabn")

    def image_input(self, model_dir: Path) -> ImageInput:
        config = read_config(model_dir)
        return ImageInput(
            size=int(config["image_size"]),
            channels=int(config["in_channels"]),
            mean=list(config["image_mean"]),
            std=list(config["image_std"]),
        )

    def load(
        self, model_dir: Path, modality: str, settings: Settings, random_init: bool = False
    ) -> tuple[Any, Encoder]:
        from safetensors.torch import load_file

        config = read_config(model_dir)
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
        return None, CifarEncoder(body).eval()

    def save(self, encoder: Encoder, processor: Any, source_dir: Path, target: Path) -> None:
        from safetensors.torch import save_file

        target.mkdir(parents=True)
        for path in source_dir.iterdir():
            if path.is_file() and not path.name.endswith(".safetensors"):
                storage.link_or_copy(path, target / path.name)
        state = encoder.body.state_dict()
        # Floats saved as fp32; integer buffers (num_batches_tracked) keep their dtype.
        tensors = {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state.items()
        }
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


register(ResNetCifarFamily())
