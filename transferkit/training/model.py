"""The trained text classifier and its on-disk format.

Every strategy saves the same layout, so evaluation, registration and serving have one
loader::

    encoder/           Hugging Face folder: config.json (with id2label), model.safetensors,
                       tokenizer files
    head.safetensors   linear head: weight [labels, hidden], bias [labels]
    transferkit.json   pooling, normalisation, max length, labels, strategy, provenance
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from transferkit import storage
from transferkit.backbones.text import TextEncoder, load_text_encoder, run_batched
from transferkit.errors import TransferkitError

MODEL_FORMAT = 1


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
    encoder: tuple[Any, TextEncoder] | None = None,
    encoder_dir: Path | None = None,
) -> None:
    """Write the model folder (atomically), with ``report`` as ``training.json``.

    Give ``encoder`` (tokenizer, encoder) when its weights changed (fine-tuning); give
    ``encoder_dir`` to reuse a frozen backbone's files unchanged (linked, not copied).
    """
    with storage.atomic_dir(output_dir) as tmp:
        target = tmp / "encoder"
        if encoder is not None:
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
        storage.write_json(tmp / "transferkit.json", card.model_dump())
        storage.write_json(tmp / "training.json", report)


def load_classifier(model_dir: Path) -> tuple[Any, TextClassifier, ModelCard]:
    """Tokenizer, classifier (eval mode, CPU) and card of a saved model folder.

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
    tokenizer, encoder = load_text_encoder(model_dir / "encoder", card.pooling, card.normalize)
    model = TextClassifier(encoder, len(card.labels))
    model.head.load_state_dict(load_file(str(model_dir / "head.safetensors")))
    return tokenizer, model.eval(), card


def predict_proba(
    model: TextClassifier,
    tokenizer: Any,
    card: ModelCard,
    texts: list[str],
    batch_size: int = 128,
    precision: str = "fp32",
) -> np.ndarray:
    """Class probabilities [texts, labels] in input order."""
    logits = run_batched(
        model, tokenizer, texts, card.max_length, batch_size, precision, description="predict"
    )
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)
