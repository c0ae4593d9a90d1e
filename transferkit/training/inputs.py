"""What the training loop feeds a model: batches of texts or of images, as tensors.

The fine-tuning loop (``transferkit.training.finetune``) is the same for every modality; it
asks an ``Inputs`` object for the batches of an epoch, the tensors of one batch and the logits
of a whole split. Text batches group texts of similar length (little padding); image batches
are plain shuffles, adapted to the backbone's input and augmented (random crop and flips) for
training only.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from transferkit.backbones.fetch import ImageInput
from transferkit.backbones.text import pad, run_batched, tokenize
from transferkit.backbones.vision import prepare, run_images
from transferkit.config import AugmentationConfig


class Inputs(Protocol):
    """Model inputs of one split."""

    def __len__(self) -> int: ...

    def epoch(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Index batches of one shuffled pass."""
        ...

    def tensors(self, index: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """The positional arguments of ``model(...)`` for the rows ``index`` (training form)."""
        ...

    def logits(self, model: nn.Module, batch_size: int, precision: str) -> np.ndarray:
        """The model's outputs for every row, in order, in evaluation form."""
        ...


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group: int = 64
) -> list[np.ndarray]:
    """Shuffled batches of similar length (the Hugging Face ``group_by_length`` scheme).

    Indices are shuffled, cut into groups of ``group`` batches, sorted by length within each
    group and batched; the batch order is shuffled again. Padding shrinks while every epoch
    still sees a different order.
    """
    order = rng.permutation(len(lengths))
    chunk = batch_size * group
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type,unused-ignore]
    return batches


class TextInputs:
    """Tokenised texts (truncated to ``max_length``), padded per batch."""

    def __init__(self, tokenizer: Any, texts: list[str], max_length: int) -> None:
        self.tokenizer = tokenizer
        self.texts = texts
        self.max_length = max_length
        self.ids = tokenize(tokenizer, texts, max_length)
        self.lengths = np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def epoch(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        return length_grouped_batches(self.lengths, batch_size, rng)

    def tensors(self, index: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        return pad([self.ids[i] for i in index], self.pad_id)

    def logits(self, model: nn.Module, batch_size: int, precision: str) -> np.ndarray:
        return run_batched(
            model, self.tokenizer, self.texts, self.max_length, batch_size, precision, "validate"
        )


def augment(
    pixels: torch.Tensor, settings: AugmentationConfig, rng: np.random.Generator
) -> torch.Tensor:
    """Random crop (zero padding, then a shifted window) and random flips, per image."""
    count, _, height, width = pixels.shape
    if settings.crop_padding:
        p = settings.crop_padding
        padded = nn.functional.pad(pixels, (p, p, p, p))
        dy = rng.integers(0, 2 * p + 1, count)
        dx = rng.integers(0, 2 * p + 1, count)
        pixels = torch.stack(
            [padded[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(count)]
        )
    if settings.horizontal_flip:
        flip = torch.from_numpy(rng.random(count) < 0.5)
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    if settings.vertical_flip:
        flip = torch.from_numpy(rng.random(count) < 0.5)
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-2), pixels)
    return pixels


class ImageInputs:
    """uint8 images [N, H, W, C], adapted to the backbone's input; augmented for training."""

    def __init__(
        self, images: np.ndarray, spec: ImageInput, augmentation: AugmentationConfig | None
    ) -> None:
        self.images = images
        self.spec = spec
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.images)

    def epoch(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(len(self.images))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def tensors(self, index: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        pixels = prepare(self.images[index], self.spec)
        if self.augmentation is not None:
            pixels = augment(pixels, self.augmentation, rng)
        return (pixels,)

    def logits(self, model: nn.Module, batch_size: int, precision: str) -> np.ndarray:
        return run_images(model, self.images, self.spec, batch_size, precision, "validate")
