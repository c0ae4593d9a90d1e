"""The two modalities a backbone embeds — texts and images — behind one interface.

Every step that feeds data to an encoder (feature extraction, the training loop, validation,
evaluation, serving) asks the ``Modality`` of its backbone: how to read a split of the dataset
artifact, how to batch it for training, how to run a module over all of it in order, and how
to read a served request. Text batches group texts of similar length (little padding); image
batches are plain shuffles, adapted to the backbone's input (``ImageInput``) and augmented
(random crop and flips) for training only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from transferkit.backbones.images import ImageInput, prepare, run_images
from transferkit.backbones.text import (
    Texts,
    encode_chunks,
    frozen_encoder,
    pad,
    pair_features,
    run_batched,
    runtime_for,
    tokenize,
)
from transferkit.config import AugmentationConfig
from transferkit.data import TextPairs, load_images
from transferkit.data.dataset import has_pairs, load_text_inputs


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
    """Tokenised texts or text pairs (truncated to ``max_length``), padded per batch."""

    def __init__(self, tokenizer: Any, texts: Texts, max_length: int) -> None:
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


class PairInputs:
    """Text pairs for a bi-encoder: each text tokenised on its own; a batch is both texts'
    padded ids (``BiEncoderClassifier``'s four arguments)."""

    def __init__(self, tokenizer: Any, pairs: TextPairs, max_length: int) -> None:
        self.first = TextInputs(tokenizer, pairs.first, max_length)
        self.second = TextInputs(tokenizer, pairs.second, max_length)

    def __len__(self) -> int:
        return len(self.first)

    def epoch(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        lengths = np.maximum(self.first.lengths, self.second.lengths)
        return length_grouped_batches(lengths, batch_size, rng)

    def tensors(self, index: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        return (*self.first.tensors(index, rng), *self.second.tensors(index, rng))

    def logits(self, model: nn.Module, batch_size: int, precision: str) -> np.ndarray:
        encoder, head = model.encoder, model.head
        assert isinstance(encoder, nn.Module)
        assert isinstance(head, nn.Linear)
        u, v = (
            run_batched(
                encoder, x.tokenizer, x.texts, x.max_length, batch_size, precision, "validate"
            )
            for x in (self.first, self.second)
        )
        with torch.no_grad():
            features = torch.from_numpy(pair_features(u, v)).to(head.weight.device)
            return head(features).float().cpu().numpy()


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


def texts_of(model_input: Any) -> list[str] | TextPairs:
    """Texts from a DataFrame with a ``text`` column (and ``text_pair``: text pairs), a
    Series, a list or one string."""
    if isinstance(model_input, pd.DataFrame) and "text_pair" in model_input.columns:
        if "text" not in model_input.columns:
            raise ValueError("input has a 'text_pair' column and no 'text'; pass both texts")
        return TextPairs(
            [str(v) for v in model_input["text"].tolist()],
            [str(v) for v in model_input["text_pair"].tolist()],
        )
    if isinstance(model_input, TextPairs):
        return model_input
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            column = model_input["text"]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"input has columns {list(model_input.columns)}; pass a 'text' column")
        return [str(v) for v in column.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.Series | list | tuple):
        return [str(v) for v in model_input]
    raise ValueError(f"cannot read texts from {type(model_input).__name__}; pass a DataFrame")


class Settings(Protocol):
    """The fetch record (BackboneInfo) or the model card: how inputs are prepared."""

    max_length: int
    image: ImageInput | None


class Modality:
    """One kind of input data."""

    name: ClassVar[str]
    noun: ClassVar[str]  # 'texts' / 'images', for messages

    def load(self, dataset_dir: Path, split: str) -> tuple[Any, np.ndarray]:
        """Inputs and integer labels of one split of an ingest_data artifact."""
        raise NotImplementedError

    def subset(self, inputs: Any, rows: np.ndarray) -> Any:
        """The inputs of ``rows``."""
        raise NotImplementedError

    def inputs(
        self,
        processor: Any,
        inputs: Any,
        settings: Settings,
        augmentation: AugmentationConfig | None = None,
        separate: bool = False,
    ) -> Inputs:
        """Inputs for the training loop (augmented when ``augmentation`` is given); pairs
        read together (a cross-encoder's) or each on its own (``separate``: a bi-encoder's)."""
        raise NotImplementedError

    def run(
        self,
        module: nn.Module,
        processor: Any,
        inputs: Any,
        settings: Settings,
        batch_size: int,
        precision: str,
        description: str,
    ) -> np.ndarray:
        """``module`` (an encoder or a classifier) applied to every input, in order."""
        raise NotImplementedError

    def stream(
        self,
        module: nn.Module,
        processor: Any,
        inputs: Any,
        settings: Settings,
        batch_size: int,
        precision: str,
        description: str,
    ) -> Iterator[np.ndarray]:
        """Like ``run``, a block of rows at a time (memory bounded for large text splits)."""
        yield self.run(module, processor, inputs, settings, batch_size, precision, description)

    def runtime(self, device: torch.device, precision: str, inputs: int) -> str:
        """The runtime ``frozen`` will compile an encoder of ``inputs`` inputs for."""
        return "torch"

    def frozen(
        self, encoder: nn.Module, precision: str, processor: Any = None, runtime: str = "torch"
    ) -> tuple[Any, str]:
        """The fastest inference form of a frozen encoder (for ``stream``), and the precision
        to run it at."""
        return encoder, precision

    def served(self, model_input: Any) -> Any:
        """The inputs of a served request (a DataFrame, list, array …)."""
        raise NotImplementedError

    def paired(self, inputs: Any, pair: bool) -> Any:
        """``inputs`` for a model that reads pairs (``pair``) or single inputs.

        Raises:
            ValueError: single inputs for a pair model, or pairs for a single-input model.
        """
        if pair:
            raise ValueError(f"a model of {self.noun} reads no pairs")
        return inputs

    def example(self, dataset_dir: Path) -> Any:
        """Two inputs as a served request gives them (the logged model's signature)."""
        raise NotImplementedError

    unlabelled_form: ClassVar[str]  # what an unlabelled file of this modality is

    def read_unlabelled(self, path: Path, uri: str, text_column: str) -> Any:
        """The inputs of an unlabelled file (drift checks, adaptation corpora), or None when
        the file is of another modality's form."""
        raise NotImplementedError


class TextModality(Modality):
    name = "text"
    noun = "texts"
    unlabelled_form = "texts (.txt or a table)"

    def read_unlabelled(self, path: Path, uri: str, text_column: str) -> Any:
        from transferkit.data.readers import read_unlabelled_texts

        if path.suffix.lower() == ".npz":
            return None
        return read_unlabelled_texts(path, uri, text_column)

    def load(self, dataset_dir: Path, split: str) -> tuple[Any, np.ndarray]:
        return load_text_inputs(dataset_dir, split)

    def subset(self, inputs: Any, rows: np.ndarray) -> Any:
        if isinstance(inputs, TextPairs):
            return inputs.take(rows)
        return [inputs[i] for i in rows]

    def inputs(
        self,
        processor: Any,
        inputs: Any,
        settings: Settings,
        augmentation: AugmentationConfig | None = None,
        separate: bool = False,
    ) -> Inputs:
        if isinstance(inputs, TextPairs) and separate:  # a bi-encoder
            return PairInputs(processor, inputs, settings.max_length)
        if isinstance(inputs, TextPairs):  # a cross-encoder: both texts through it at once
            return TextInputs(processor, inputs.joined(), settings.max_length)
        return TextInputs(processor, list(inputs), settings.max_length)

    def run(self, module, processor, inputs, settings, batch_size, precision, description):
        """Text pairs (``TextPairs``) go through a cross-encoder's ``module`` tokenised
        together when ``settings`` (its card) says so, or give the pair_features of an
        encoder's two embeddings."""
        if isinstance(inputs, TextPairs) and getattr(settings, "cross_encoder", False):
            texts: Any = inputs.joined()
            return run_batched(
                module, processor, texts, settings.max_length, batch_size, precision, description
            )
        if isinstance(inputs, TextPairs):
            first, second = (
                self.run(module, processor, texts, settings, batch_size, precision, description)
                for texts in (inputs.first, inputs.second)
            )
            return pair_features(first, second)
        return run_batched(
            module, processor, list(inputs), settings.max_length, batch_size, precision, description
        )

    def stream(self, module, processor, inputs, settings, batch_size, precision, description):
        if isinstance(inputs, TextPairs):  # both texts chunk by chunk, in step
            length = settings.max_length
            firsts, seconds = (
                encode_chunks(module, processor, texts, length, batch_size, precision, description)
                for texts in (inputs.first, inputs.second)
            )
            return (pair_features(u, v) for u, v in zip(firsts, seconds, strict=True))
        return encode_chunks(
            module, processor, list(inputs), settings.max_length, batch_size, precision, description
        )

    def runtime(self, device: torch.device, precision: str, inputs: int) -> str:
        return runtime_for(device, precision, inputs)

    def frozen(
        self, encoder: nn.Module, precision: str, processor: Any = None, runtime: str = "torch"
    ) -> tuple[Any, str]:
        return frozen_encoder(encoder, precision, processor, runtime)

    def served(self, model_input: Any) -> Any:
        return texts_of(model_input)

    def paired(self, inputs: Any, pair: bool) -> Any:
        if isinstance(inputs, pd.DataFrame):  # a served request's columns
            inputs = texts_of(inputs)
        if isinstance(inputs, TextPairs) != pair:
            raise ValueError(
                "this model reads text pairs; pass columns text and text_pair"
                if pair
                else "this model reads one text per row; pass a 'text' column, no text_pair"
            )
        return inputs

    def example(self, dataset_dir: Path) -> Any:
        frame = pd.DataFrame({"text": ["An example input text.", "Another one."]})
        if has_pairs(dataset_dir):
            frame["text_pair"] = ["A second text.", "Its partner."]
        return frame


class ImageModality(Modality):
    name = "image"
    noun = "images"
    unlabelled_form = "an .npz of images"

    def read_unlabelled(self, path: Path, uri: str, text_column: str) -> Any:
        from transferkit.data.images import read_unlabelled_npz

        if path.suffix.lower() != ".npz":
            return None
        return read_unlabelled_npz(path, uri)

    def load(self, dataset_dir: Path, split: str) -> tuple[Any, np.ndarray]:
        return load_images(dataset_dir, split)

    def subset(self, inputs: Any, rows: np.ndarray) -> Any:
        return inputs[rows]

    def inputs(
        self,
        processor: Any,
        inputs: Any,
        settings: Settings,
        augmentation: AugmentationConfig | None = None,
        separate: bool = False,
    ) -> Inputs:
        assert settings.image is not None
        return ImageInputs(inputs, settings.image, augmentation)

    def run(self, module, processor, inputs, settings, batch_size, precision, description):
        assert settings.image is not None
        return run_images(
            module, self.served(inputs), settings.image, batch_size, precision, description
        )

    def served(self, model_input: Any) -> Any:
        from transferkit.data.images import as_images

        return as_images(np.asarray(model_input), "images")

    def example(self, dataset_dir: Path) -> Any:
        return load_images(dataset_dir, "test")[0][:2]  # as stored: uint8 [N, H, W, C]


MODALITIES: dict[str, Modality] = {m.name: m for m in (TextModality(), ImageModality())}


def modality_of(name: str) -> Modality:
    """The modality called ``name`` ('text' or 'image')."""
    return MODALITIES[name]


def dataset_modality(dataset_dir: Path) -> Modality:
    """The modality of an ingest_data artifact (its stats.json says; older ones: its files)."""
    import json

    stats = dataset_dir / "stats.json"
    if stats.exists():
        name = json.loads(stats.read_text()).get("modality")
        if name in MODALITIES:
            return MODALITIES[name]
    return MODALITIES["image" if (dataset_dir / "train_images.npy").exists() else "text"]


def card_modality(name: str, image: ImageInput | None) -> Modality:
    """A model card's modality; cards written before families name none, and only image
    models had an ``image`` input spec."""
    return MODALITIES[name or ("text" if image is None else "image")]
