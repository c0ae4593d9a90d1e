"""The trained classifier (text or image) and its on-disk format.

Every strategy saves the same layout, so evaluation, registration and serving have one
loader::

    encoder/           the backbone folder: config.json (with id2label), model.safetensors,
                       tokenizer files (text) or the CIFAR ResNet / HF vision config (images)
    head.safetensors   linear head: weight [labels, hidden], bias [labels]
    transferkit.json   task, labels, strategy, provenance; text: pooling, normalisation, max
                       length; images: the input adaptation (size, channels, mean, std)
    training.json      the run's record: seconds, metrics, history (not part of the model)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from transferkit import storage
from transferkit.backbones.fetch import ImageInput
from transferkit.backbones.text import TextEncoder, load_text_encoder, run_batched
from transferkit.backbones.vision import (
    RESNET_CIFAR,
    ImageEncoder,
    load_image_encoder,
    run_images,
)
from transferkit.errors import TransferkitError
from transferkit.metrics import softmax

MODEL_FORMAT = 1
CARD = "transferkit.json"
RUN_RECORD = "training.json"
# Card fields that say where a model came from, not what it computes.
PROVENANCE = (
    "strategy",
    "backbone_source",
    "backbone_fingerprint",
    "data_fingerprint",
    "environment",
)


class ModelCard(BaseModel):
    """``transferkit.json``: everything needed to rebuild and describe the classifier."""

    format: int = MODEL_FORMAT
    task: str = "text-classification"
    labels: list[str]
    label_values: list[str]
    pooling: str
    normalize: bool
    max_length: int
    strategy: str
    backbone_source: str
    backbone_fingerprint: str
    data_fingerprint: str
    environment: dict[str, str] = {}
    image: ImageInput | None = None


class ImageClassifier(nn.Module):
    """Vision encoder followed by a linear head: normalised pixels → class logits."""

    def __init__(self, encoder: ImageEncoder, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.hidden_size, num_labels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels).float())


class TextClassifier(nn.Module):
    """Encoder (transformer + pooling) followed by a linear head: texts → class logits."""

    def __init__(self, encoder: TextEncoder, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask).float())


def save_head(head: nn.Linear, path: Path) -> None:
    """Write the head's weight and bias as safetensors."""
    from safetensors.torch import save_file

    save_file(
        {
            "weight": head.weight.detach().float().cpu().contiguous(),
            "bias": head.bias.detach().float().cpu().contiguous(),
        },
        str(path),
    )


def save_classifier(
    output_dir: Path,
    card: ModelCard,
    head: nn.Linear,
    report: dict[str, Any],
    encoder: tuple[Any, TextEncoder | ImageEncoder] | None = None,
    encoder_dir: Path | None = None,
) -> None:
    """Write the model folder (atomically), with ``report`` as ``training.json``.

    Give ``encoder`` (tokenizer or None, encoder) when its weights changed (fine-tuning);
    ``encoder_dir`` (the backbone folder) is reused unchanged otherwise (linked, not copied),
    and gives a fine-tuned CIFAR ResNet its config.
    """
    with storage.atomic_dir(output_dir) as tmp:
        target = tmp / "encoder"
        if encoder is not None and isinstance(encoder[1], ImageEncoder):
            assert encoder_dir is not None
            save_image_encoder(encoder[1], encoder_dir, target)
        elif encoder is not None:
            tokenizer, module = encoder
            module.body.save_pretrained(target)  # type: ignore[operator]
            tokenizer.save_pretrained(target)
        else:
            assert encoder_dir is not None
            storage.link_or_copy_tree(encoder_dir, target)
        # Label names in the HF config let the folder stand on its own. Written by atomic
        # replace: config.json may be a hard link to the backbone's file.
        hf_config = json.loads((target / "config.json").read_text())
        hf_config["id2label"] = dict(enumerate(card.labels))
        hf_config["label2id"] = {name: i for i, name in enumerate(card.labels)}
        storage.write_json(target / "config.json", hf_config)
        save_head(head, tmp / "head.safetensors")
        storage.write_json(tmp / CARD, card.model_dump())
        storage.write_json(tmp / RUN_RECORD, report)


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of what decides a model folder's served outputs: every file of the encoder
    (weights, configs, tokenizer or processor files), the head, and the card without its
    provenance (labels, pooling, normalisation, max length, image input). The run record
    (training.json: seconds, metrics) and the card's strategy, sources, fingerprints and
    environment are left out, so the same weights hash alike however long they took.
    Every other file counts: a file added to the layout changes the hash rather than being
    ignored."""
    card = json.loads((model_dir / CARD).read_text())
    behaviour = {key: value for key, value in card.items() if key not in PROVENANCE}
    card_hash = hashlib.sha256(json.dumps(behaviour, sort_keys=True).encode()).hexdigest()
    return storage.sha256_tree(model_dir, known={CARD: card_hash}, skip={RUN_RECORD})


def save_image_encoder(encoder: ImageEncoder, source_dir: Path, target: Path) -> None:
    """A trained vision encoder as a backbone folder: the source's config files, new weights."""
    from safetensors.torch import save_file

    if encoder.kind != RESNET_CIFAR:
        encoder.body.save_pretrained(target)  # type: ignore[operator]
        for name in ("preprocessor_config.json",):
            if (source_dir / name).exists():
                storage.link_or_copy(source_dir / name, target / name)
        return
    target.mkdir(parents=True)
    for path in source_dir.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            storage.link_or_copy(path, target / path.name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in encoder.body.state_dict().items()}
    # num_batches_tracked is an integer buffer: keep its dtype.
    state.update(
        {
            k: v.detach().cpu().contiguous()
            for k, v in encoder.body.state_dict().items()
            if not v.is_floating_point()
        }
    )
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})


def load_classifier(model_dir: Path) -> tuple[Any, TextClassifier | ImageClassifier, ModelCard]:
    """Tokenizer (None for images), classifier (eval mode, CPU) and card of a model folder.

    Raises:
        TransferkitError: the folder is not a transferkit model of a known format.
    """
    from safetensors.torch import load_file

    card_path = model_dir / "transferkit.json"
    if not card_path.exists():
        raise TransferkitError(f"{model_dir}: not a transferkit model (no transferkit.json)")
    card = ModelCard.model_validate_json(card_path.read_text())
    if card.format != MODEL_FORMAT:
        raise TransferkitError(
            f"{model_dir}: model format {card.format}, this transferkit reads {MODEL_FORMAT}; "
            "upgrade transferkit"
        )
    model: TextClassifier | ImageClassifier
    tokenizer = None
    if card.image is not None:
        model = ImageClassifier(load_image_encoder(model_dir / "encoder"), len(card.labels))
    else:
        tokenizer, encoder = load_text_encoder(model_dir / "encoder", card.pooling, card.normalize)
        model = TextClassifier(encoder, len(card.labels))
    model.head.load_state_dict(load_file(str(model_dir / "head.safetensors")))
    return tokenizer, model.eval(), card


def _run(
    module: nn.Module,
    tokenizer: Any,
    card: ModelCard,
    inputs: list[str] | np.ndarray,
    batch_size: int,
    precision: str,
    description: str,
) -> np.ndarray:
    """``module`` (the classifier or its encoder) applied to texts or uint8 images, in order."""
    if card.image is not None:
        return run_images(
            module, as_image_batch(inputs), card.image, batch_size, precision, description
        )
    return run_batched(
        module, tokenizer, list(inputs), card.max_length, batch_size, precision, description
    )


def predict_proba(
    model: TextClassifier | ImageClassifier,
    tokenizer: Any,
    card: ModelCard,
    inputs: list[str] | np.ndarray,
    batch_size: int = 128,
    precision: str = "fp32",
) -> np.ndarray:
    """Class probabilities [inputs, labels] in input order.

    ``inputs`` are texts for a text model, uint8 images [N, H, W, C] for an image model.
    """
    return softmax(_run(model, tokenizer, card, inputs, batch_size, precision, "predict"))


def embed(
    model: TextClassifier | ImageClassifier,
    tokenizer: Any,
    card: ModelCard,
    inputs: list[str] | np.ndarray,
    batch_size: int = 128,
    precision: str = "fp32",
) -> np.ndarray:
    """The classifier's encoder outputs [inputs, hidden] (the features its head reads)."""
    return _run(model.encoder, tokenizer, card, inputs, batch_size, precision, "embed")


def as_image_batch(inputs: Any) -> np.ndarray:
    """uint8 images [N, H, W, C] from an array [N, H, W] (grey) or [N, H, W, C].

    Raises:
        DataError: anything else, naming the shape and the expected one.
    """
    from transferkit.data.images import as_images

    return as_images(np.asarray(inputs), "images")
