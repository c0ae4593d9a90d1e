"""Hugging Face vision models: ResNet, ConvNeXt, ViT, DINOv2, Swin … (``AutoModel`` folders
with an image processor, whose size and normalisation are used)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.backbones.base import (
    Capabilities,
    Encoder,
    Family,
    Settings,
    model_types,
    read_config,
    register,
)
from transferkit.backbones.encoder import has_tokenizer, text_blocks
from transferkit.backbones.images import ImageInput

# Attention projections named like BERT's: LoRA's default targets there.
ATTENTION_TARGETS = {
    "vit": ("query", "value"),
    "dinov2": ("query", "value"),
    "swin": ("query", "value"),
}


class HFVisionEncoder(Encoder):
    """A Hugging Face vision body: normalised images [B, C, H, W] → feature vectors."""

    def __init__(self, body: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self._hidden_size = hidden_size

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def blocks(self) -> list[nn.Module]:
        return text_blocks(self.body)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.body(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        return pooled.flatten(1).float()


def hidden_size(config: Any) -> int:
    """Feature width of a vision config: hidden_size, or the last stage's width."""
    return int(getattr(config, "hidden_size", None) or config.hidden_sizes[-1])


class VisionFamily(Family):
    """Hugging Face vision models: probe, partial, full, scratch; LoRA on attention models;
    AdaBN where the model has BatchNorm."""

    name = "vision"
    title = "Hugging Face vision model"
    modalities = ("image",)
    priority = 40

    def detect(self, hf_config: dict[str, Any], files: set[str]) -> bool:
        return "preprocessor_config.json" in files and not has_tokenizer(files)

    def capabilities(self, modality: str, hf_config: dict[str, Any]) -> Capabilities:
        model_type, _ = model_types(hf_config)
        targets = ATTENTION_TARGETS.get(model_type, ())
        return Capabilities(
            lora_targets=targets,
            lora=bool(targets),
            adaptation="adabn" if model_type in ("resnet", "bit", "regnet") else None,
        )

    def image_input(self, model_dir: Path) -> ImageInput:
        config = read_config(model_dir)
        processor: dict[str, Any] = {}
        path = model_dir / "preprocessor_config.json"
        if path.exists():
            processor = json.loads(path.read_text())
        size = (
            processor.get("crop_size") or processor.get("size") or config.get("image_size") or 224
        )
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge") or 224
        channels = int(config.get("num_channels", 3))
        mean = processor.get("image_mean") or [0.5] * channels
        std = processor.get("image_std") or [0.5] * channels
        return ImageInput(size=int(size), channels=channels, mean=list(mean), std=list(std))

    def load(
        self, model_dir: Path, modality: str, settings: Settings, random_init: bool = False
    ) -> tuple[Any, Encoder]:
        from transformers import AutoConfig, AutoModel

        if random_init:
            hf = AutoModel.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        else:
            hf = AutoModel.from_pretrained(
                model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
            )
        return None, HFVisionEncoder(hf, hidden_size(hf.config)).eval()


register(VisionFamily())
