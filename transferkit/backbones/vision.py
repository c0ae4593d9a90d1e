"""Hugging Face vision models: ResNet, ConvNeXt (v1, v2), ViT, DINOv2 (with or without
registers), Swin (v1, v2) — ``AutoModel`` folders with an image processor, whose size and
normalisation are used.

Each architecture is read the way its own classification head reads it, so a linear probe
sees the features the model was trained to expose:

- ResNet: the global average pool of the last stage ([B, C, 1, 1], flattened);
- ConvNeXt: the layer-normed global average pool (its ``pooler_output``);
- ViT: the CLS token of the final layer norm. ViT's ``pooler`` (dense + tanh) is not built:
  many checkpoints ship it untrained, and ``ViTForImageClassification`` does not use it;
- DINOv2: CLS ⊕ mean of the patch tokens (registers excluded), 2 × hidden_size wide — the
  linear-evaluation protocol of Oquab et al. 2023 and ``Dinov2ForImageClassification``'s input;
- Swin: the average pool of the layer-normed last stage (its ``pooler_output``).

Only these architectures are claimed: any other ``model_type`` (a text model, BEiT, a model
this module has not been taught to pool) is left to the other families or refused by
detection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.backbones.base import (
    Capabilities,
    Encoder,
    Family,
    Settings,
    checked_pretrained,
    model_types,
    read_config,
    register,
)
from transferkit.backbones.images import ImageInput
from transferkit.errors import BackboneError

log = logging.getLogger(__name__)

# The block functions take the Hugging Face model (typed Any: its submodules are attributes
# torch's stubs cannot see).


def _resnet_blocks(body: Any) -> list[nn.Module]:
    # The stem (7×7 convolution, batch norm, max pool) first, then every residual layer.
    return [body.embedder, *(layer for stage in body.encoder.stages for layer in stage.layers)]


def _has_parameters(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def _convnext_blocks(body: Any) -> list[nn.Module]:
    # A stage's downsampling (layer norm + strided 2×2 convolution) runs before its first
    # layer: one unit with it, so the blocks cover every parameter between the stem and the
    # final norm and freezing below a block freezes the downsampling below it too.
    blocks: list[nn.Module] = []
    pending: list[nn.Module] = []
    for stage in body.encoder.stages:
        if _has_parameters(stage.downsampling_layer):
            pending.append(stage.downsampling_layer)
        for layer in stage.layers:
            blocks.append(nn.ModuleList([*pending, layer]) if pending else layer)
            pending = []
    return blocks


def _transformer_blocks(body: Any) -> list[nn.Module]:
    # transformers 5 keeps ViT's blocks at ``layers``, DINOv2's (and older ViTs') at
    # ``encoder.layer``.
    layers = getattr(body, "layers", None)
    if layers is None:
        layers = body.encoder.layer
    return list(layers)


def _swin_blocks(body: Any) -> list[nn.Module]:
    # Every block of every stage; a stage's patch merging (which follows its last block) is
    # one unit with that block.
    blocks: list[nn.Module] = []
    for stage in body.encoder.layers:
        layers = list(stage.blocks)
        if _has_parameters(stage.downsample) and layers:
            layers[-1] = nn.ModuleList([layers[-1], stage.downsample])
        blocks += layers
    return blocks


def _pooled(body: Any, out: Any) -> torch.Tensor:
    return out.pooler_output.flatten(1)


def _cls(body: Any, out: Any) -> torch.Tensor:
    return out.last_hidden_state[:, 0]


def _cls_mean_patch(body: Any, out: Any) -> torch.Tensor:
    tokens = out.last_hidden_state
    first_patch = 1 + int(getattr(body.config, "num_register_tokens", 0) or 0)
    return torch.cat([tokens[:, 0], tokens[:, first_patch:].mean(dim=1)], dim=1)


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face vision architecture is pooled, split into blocks and adapted."""

    pooling: str  # what the probe reads, in words (README, backbone.json)
    pool: Callable[[Any, Any], torch.Tensor]  # (body, model output) → [B, width]
    blocks: Callable[[Any], list[nn.Module]]
    lora_targets: tuple[str, ...] = ()
    batch_norm: bool = False  # AdaBN re-estimates its statistics on the target images
    width_factor: int = 1  # feature width = factor × the config's width
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)


_CONVNEXT = Architecture(
    "layer-normed global average pool",
    _pooled,
    _convnext_blocks,
    # The pointwise (1×1) convolutions are nn.Linear layers and hold nearly all of a block's
    # weights (the 7×7 depthwise convolution is tiny): the counterpart of a transformer's MLP.
    lora_targets=("pwconv1", "pwconv2"),
)
_DINOV2 = Architecture(
    "CLS ⊕ mean patch token (final layer norm)",
    _cls_mean_patch,
    _transformer_blocks,
    lora_targets=("q_proj", "v_proj"),
    width_factor=2,
)
# model_type → how it is read. LoRA targets are the attention query and value projections
# (Hu et al. 2021) under the module names of the installed transformers (checked by the tests
# on tiny models).
ARCHITECTURES: dict[str, Architecture] = {
    "resnet": Architecture("global average pool", _pooled, _resnet_blocks, batch_norm=True),
    "convnext": _CONVNEXT,
    "convnextv2": _CONVNEXT,
    "vit": Architecture(
        "CLS token (final layer norm)",
        _cls,
        _transformer_blocks,
        lora_targets=("q_proj", "v_proj"),
        load_kwargs={"add_pooling_layer": False},
        # Inputs resized by backbone.image.size still fit its position embeddings.
        forward_kwargs={"interpolate_pos_encoding": True},
    ),
    "dinov2": _DINOV2,
    "dinov2_with_registers": _DINOV2,
    "swin": Architecture(
        "average pool of the layer-normed last stage",
        _pooled,
        _swin_blocks,
        lora_targets=("q_proj", "v_proj"),
    ),
    "swinv2": Architecture(
        "average pool of the layer-normed last stage",
        _pooled,
        _swin_blocks,
        lora_targets=("query", "value"),
    ),
}


def architecture_of(hf_config: dict[str, Any], source: str = "backbone") -> Architecture:
    """How a vision model of this ``config.json`` is read.

    Raises:
        BackboneError: its model_type is not one the vision family knows.
    """
    model_type, _ = model_types(hf_config)
    if model_type not in ARCHITECTURES:
        raise BackboneError(
            f"{source}: model_type '{model_type[:80] or 'none'}' is not a vision architecture "
            f"transferkit knows ({', '.join(ARCHITECTURES)}); use one of those or unset "
            "backbone.family to detect the right family"
        )
    return ARCHITECTURES[model_type]


def feature_width(hf_config: dict[str, Any]) -> int:
    """Width of the pooled features of a vision ``config.json`` (what ``backbone.json``
    records): the last stage's width, or hidden_size — twice it for DINOv2's CLS ⊕ mean."""
    arch = architecture_of(hf_config)
    if hf_config.get("hidden_sizes"):
        width = int(hf_config["hidden_sizes"][-1])
    elif "embed_dim" in hf_config and "depths" in hf_config:  # Swin: doubles per stage
        width = int(hf_config["embed_dim"]) * 2 ** (len(hf_config["depths"]) - 1)
    else:
        width = int(hf_config["hidden_size"])
    return arch.width_factor * width


class HFVisionEncoder(Encoder):
    """A Hugging Face vision body: normalised images [B, C, H, W] → feature vectors, pooled
    as its architecture's classification head reads them (see the module's docstring)."""

    def __init__(self, body: nn.Module, architecture: Architecture) -> None:
        super().__init__()
        self.body = body
        self.architecture = architecture
        config: Any = body.config
        self._hidden_size = feature_width(config.to_dict())

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def blocks(self) -> list[nn.Module]:
        return self.architecture.blocks(self.body)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.body(pixel_values=pixels, **self.architecture.forward_kwargs)
        return self.architecture.pool(self.body, out).float()


def _edge(value: Any) -> int | None:
    """The square side of a processor size: an int, or height / shortest_edge of a dict."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "longest_edge"):
            if isinstance(value.get(key), int):
                return int(value[key])
    return None


def processor_size(processor: dict[str, Any]) -> int | None:
    """The side of the images the processor hands the model: its centre crop when it crops
    (BiT/DINOv2: resize to 256, crop 224), else its resize target (ViT: height; ConvNeXt and
    ResNet: shortest_edge, cropped to it by crop_pct)."""
    if processor.get("do_center_crop") and _edge(processor.get("crop_size")):
        return _edge(processor["crop_size"])
    if processor.get("do_resize", True) and _edge(processor.get("size")):
        return _edge(processor["size"])
    return None


class VisionFamily(Family):
    """Hugging Face vision models: probe, partial, full, scratch; LoRA on the attention
    projections (ViT, DINOv2, Swin) and ConvNeXt's pointwise layers; AdaBN for ResNet."""

    name = "vision"
    title = "Hugging Face vision model"
    modalities = ("image",)
    priority = 40

    def detect(self, hf_config: dict[str, Any], files: set[str]) -> bool:
        model_type, _ = model_types(hf_config)
        return model_type in ARCHITECTURES

    def capabilities(self, modality: str, hf_config: dict[str, Any]) -> Capabilities:
        arch = architecture_of(hf_config)
        return Capabilities(
            lora_targets=arch.lora_targets,
            # ResNet: convolutions only, no nn.Linear projection to adapt by default.
            lora=bool(arch.lora_targets),
            adaptation="adabn" if arch.batch_norm else None,
        )

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            ("ResNet", {"model_type": "resnet"}),
            ("ConvNeXt", {"model_type": "convnext"}),
            ("ViT, DINOv2, Swin", {"model_type": "vit"}),
        ]

    def feature_size(self, hf_config: dict[str, Any], modality: str) -> int:
        return feature_width(hf_config)

    def image_input(self, model_dir: Path) -> ImageInput:
        """Size, channels, mean and std from the folder's ``preprocessor_config.json``.

        Raises:
            BackboneError: no processor file, or one without a size or normalisation.
        """
        config = read_config(model_dir)
        model_type = config.get("model_type", "?")
        path = model_dir / "preprocessor_config.json"
        if not path.exists():
            raise BackboneError(
                f"{model_dir}: no preprocessor_config.json, so the input size and "
                f"normalisation of this {model_type} model are unknown; save its image "
                "processor beside it (image_processor.save_pretrained)"
            )
        try:
            processor = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            processor = None
        if not isinstance(processor, dict):
            raise BackboneError(
                f"{path}: not a JSON object; save the image processor again "
                "(image_processor.save_pretrained)"
            )
        size = processor_size(processor) or _edge(config.get("image_size"))
        channels = int(config.get("num_channels", 3))
        if processor.get("do_normalize", True):
            mean, std = processor.get("image_mean"), processor.get("image_std")
        else:
            mean, std = [0.0] * channels, [1.0] * channels
        for key, value in (("size", size), ("image_mean", mean), ("image_std", std)):
            if not value:
                raise BackboneError(
                    f"{path}: no {key}, so the input of this {model_type} model is unknown; "
                    "save the model's own image processor beside it "
                    "(image_processor.save_pretrained)"
                )
        return ImageInput(
            size=int(size),  # type: ignore[arg-type]
            channels=channels,
            mean=[float(v) for v in mean],  # type: ignore[union-attr]
            std=[float(v) for v in std],  # type: ignore[union-attr]
        )

    def load(
        self, model_dir: Path, modality: str, settings: Settings, random_init: bool = False
    ) -> tuple[Any, Encoder]:
        from transformers import AutoConfig, AutoModel

        arch = architecture_of(read_config(model_dir), str(model_dir))
        if random_init:
            hf = AutoModel.from_config(
                AutoConfig.from_pretrained(model_dir, local_files_only=True),
                dtype=torch.float32,
                **arch.load_kwargs,
            )
        else:
            hf = _from_pretrained(model_dir, arch)
        return None, HFVisionEncoder(hf, arch).eval()


def _from_pretrained(model_dir: Path, arch: Architecture) -> Any:
    """The fp32 model of a folder, every weight it needs present (an unused pooler or the
    source task's head logged)."""
    return checked_pretrained(model_dir, **arch.load_kwargs)


register(VisionFamily())
