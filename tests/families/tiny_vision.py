"""Tiny random-weight Hugging Face vision models in their real folder format, and a small
synthetic image task a frozen random backbone plus a linear probe can learn.

Each folder is what ``save_pretrained`` of the model and of its own image processor write
(config.json, model.safetensors, preprocessor_config.json), with the processor class the
Hub's checkpoints of that architecture use: ConvNeXt's for ResNet and ConvNeXt, ViT's for ViT
and Swin, BiT's (resize then centre crop) for DINOv2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.backbones.images import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32  # input side of every tiny model
HALF = [0.5, 0.5, 0.5]


def _processor(kind: str) -> Any:
    # The Pil variants are the same processors (and save the same JSON) without torchvision.
    from transformers import BitImageProcessorPil, ConvNextImageProcessorPil, ViTImageProcessorPil

    if kind == "convnext":
        return ConvNextImageProcessorPil(
            size={"shortest_edge": SIZE},
            crop_pct=0.875,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        )
    if kind == "vit":
        return ViTImageProcessorPil(
            size={"height": SIZE, "width": SIZE}, image_mean=HALF, image_std=HALF
        )
    return BitImageProcessorPil(
        size={"shortest_edge": SIZE + 4},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def _model(model_type: str) -> tuple[Any, str]:
    """A tiny random model of ``model_type`` and the kind of its image processor."""
    import transformers as tf

    vit_like = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": SIZE,
        "patch_size": 8,
    }
    swin_like = {
        "image_size": SIZE,
        "patch_size": 4,
        "embed_dim": 16,
        "depths": [1, 2],
        "num_heads": [1, 2],
        "window_size": 4,
    }
    convnext_like = {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 2]}
    if model_type == "resnet":
        config = tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        )
        return tf.ResNetModel(config), "convnext"
    if model_type == "convnext":
        # Layer scale at its trained magnitude, not the 1e-6 of a fresh model, which would
        # leave every block an identity and hide whether pooling or LoRA reach them.
        config = tf.ConvNextConfig(layer_scale_init_value=0.5, **convnext_like)
        return tf.ConvNextModel(config), "convnext"
    if model_type == "convnextv2":
        return tf.ConvNextV2Model(tf.ConvNextV2Config(**convnext_like)), "convnext"
    if model_type == "vit":
        # Saved with ViT's pooler, as Hub checkpoints are; the family does not build it.
        config = tf.ViTConfig(intermediate_size=64, **vit_like)
        return tf.ViTModel(config, add_pooling_layer=True), "vit"
    if model_type == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, **vit_like)), "bit"
    if model_type == "dinov2_with_registers":
        config = tf.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **vit_like)
        return tf.Dinov2WithRegistersModel(config), "bit"
    if model_type == "swin":
        return tf.SwinModel(tf.SwinConfig(**swin_like)), "vit"
    if model_type == "swinv2":
        return tf.Swinv2Model(tf.Swinv2Config(**swin_like)), "vit"
    raise ValueError(model_type)


MODEL_TYPES = (
    "resnet",
    "convnext",
    "convnextv2",
    "vit",
    "dinov2",
    "dinov2_with_registers",
    "swin",
    "swinv2",
)
# The five the issue names (trained on the synthetic task); the rest share their code paths.
MAIN = ("resnet", "convnext", "vit", "dinov2", "swin")


def save_tiny_vision(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A tiny random ``model_type`` model saved as a Hugging Face folder with its processor."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    model, kind = _model(model_type)
    model.eval()
    if model_type == "resnet":
        # Non-trivial batch-norm statistics, as a trained checkpoint has.
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    _processor(kind).save_pretrained(folder)
    return folder


def colour_task(count: int, seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images [N, size, size, 3] of grey noise with one coloured square (red, green
    or blue: the label) of random side and position. Learnable only from features that see
    the square wherever it is, against noise covering the whole image."""
    rng = np.random.default_rng(seed)
    images = rng.integers(40, 160, size=(count, size, size, 1)).repeat(3, axis=3)
    labels = rng.integers(0, 3, size=count)
    for image, label in zip(images, labels, strict=True):
        side = int(rng.integers(size // 4, size // 2 + 1))
        top, left = rng.integers(0, size - side + 1, size=2)
        patch = image[top : top + side, left : left + side]
        patch[...] = rng.integers(20, 60, size=patch.shape)
        patch[..., label] = rng.integers(180, 255, size=patch.shape[:2])
    return images.astype(np.uint8), labels
