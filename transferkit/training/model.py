"""The trained classifier (any family, any modality) and its on-disk format.

Every strategy saves the same layout, so evaluation, registration and serving have one
loader::

    encoder/           the backbone folder: config.json (with id2label), model.safetensors,
                       tokenizer files (text) or the CIFAR ResNet / HF vision config (images)
    head.safetensors   linear head: weight [labels, hidden], bias [labels] (text pairs:
                       [labels, 4 × hidden], over the pair's features; regression: one row)
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
from transferkit.backbones.base import Encoder, Family, folder_family
from transferkit.backbones.images import ImageInput
from transferkit.backbones.modality import Modality, card_modality
from transferkit.backbones.text import pair_tensor
from transferkit.data.dataset import TextPairs
from transferkit.errors import TransferkitError
from transferkit.metrics import Decision, softmax
from transferkit.multilabel import sigmoid

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
    # The backbone family and the modality; '' in cards written before families (read back
    # by detection from the encoder folder and by whether ``image`` is set).
    family: str = ""
    modality: str = ""
    # A binary model's threshold (training.decision_threshold); None: the most probable
    # label. Left out of cards without one, so that their fingerprints stay as they were.
    decision: Decision | None = None
    # task: multi_label: a sigmoid per label (independent probabilities) and a set per row.
    # Left out of single-label cards, like ``decision``.
    multi_label: bool = False
    # task: regression: the head's one output is the predicted score (``labels``: ['score']).
    regression: bool = False
    # data.text_pair_column: the model reads two texts per row; its head reads their
    # pair_features ([u, v, |u - v|, u * v] of the frozen encoder's embeddings), or, for a
    # cross-encoder (an encoder fine-tuned on the pairs), the encoder's output of both texts
    # tokenised together.
    pair: bool = False
    cross_encoder: bool = False

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """Predicted label ids [rows] of class probabilities [rows, labels] (label sets:
        boolean [rows, labels]; a regression model: its scores [rows])."""
        if self.regression:
            return np.asarray(proba[:, 0], dtype=np.float64)
        return (self.decision or Decision()).apply(proba)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The head's logits as probabilities: softmax over labels, or a sigmoid per label
        for a multi-label model; a regression model's outputs are its scores, as they are."""
        if self.regression:
            return np.asarray(logits, dtype=np.float64)
        return sigmoid(logits) if self.multi_label else softmax(logits)

    def head_inputs(self, hidden_size: int) -> int:
        """The width of the features the head reads: the encoder's, or a pair's four."""
        return 4 * hidden_size if self.pair and not self.cross_encoder else hidden_size

    def input_modality(self) -> Modality:
        """The modality of the inputs this model classifies."""
        return card_modality(self.modality, self.image)


class Classifier(nn.Module):
    """A family's encoder followed by a linear head: model inputs → class logits.

    The inputs are what the encoder takes: (input_ids, attention_mask) for text, normalised
    pixels for images.
    """

    def __init__(self, encoder: Encoder, num_labels: int, inputs: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(inputs or encoder.hidden_size, num_labels)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(*inputs).float())


class BiEncoderClassifier(Classifier):
    """A bi-encoder of text pairs in training: each text through the encoder on its own,
    the head over their ``pair_features`` ([u, v, |u - v|, u * v]). Saved and served as a
    ``Classifier`` whose card has ``pair`` (``_outputs``)."""

    def __init__(self, encoder: Encoder, num_labels: int) -> None:
        super().__init__(encoder, num_labels, 4 * encoder.hidden_size)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        ids, mask, pair_ids, pair_mask = inputs
        u, v = self.encoder(ids, mask).float(), self.encoder(pair_ids, pair_mask).float()
        return self.head(pair_tensor(u, v))


def card_json(card: ModelCard) -> dict[str, Any]:
    """The card as stored: fields added for newer tasks left out at their defaults, so that
    single-label models keep the cards (and fingerprints) they had."""
    unset: dict[str, Any] = {}
    if card.decision is None:
        unset["decision"] = True
    elif card.decision.thresholds is None:
        unset["decision"] = {"thresholds"}
    for flag in ("multi_label", "regression", "pair", "cross_encoder"):
        if not getattr(card, flag):
            unset[flag] = True
    return card.model_dump(exclude=unset)


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
    encoder_dir: Path,
    encoder: tuple[Any, Encoder] | None = None,
) -> None:
    """Write the model folder (atomically), with ``report`` as ``training.json``.

    Give ``encoder`` (processor or None, encoder) when its weights changed (fine-tuning): its
    family writes it (``Family.save``), reading config files from ``encoder_dir`` (the
    backbone folder), which is reused unchanged otherwise (linked, not copied).
    """
    with storage.atomic_dir(output_dir) as tmp:
        target = tmp / "encoder"
        if encoder is not None:
            processor, module = encoder
            folder_family(encoder_dir, card.family).save(module, processor, encoder_dir, target)
        else:
            storage.link_or_copy_tree(encoder_dir, target)
        # Label names in the HF config let the folder stand on its own. Written by atomic
        # replace: config.json may be a hard link to the backbone's file.
        hf_config = json.loads((target / "config.json").read_text())
        hf_config["id2label"] = dict(enumerate(card.labels))
        hf_config["label2id"] = {name: i for i, name in enumerate(card.labels)}
        storage.write_json(target / "config.json", hf_config)
        save_head(head, tmp / "head.safetensors")
        storage.write_json(tmp / CARD, card_json(card))
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


def card_family(model_dir: Path, card: ModelCard) -> Family:
    """The family of a model folder's encoder."""
    return folder_family(model_dir / "encoder", card.family)


def load_classifier(model_dir: Path) -> tuple[Any, Classifier, ModelCard]:
    """Processor (tokenizer; None for images), classifier (eval mode, CPU) and card of a
    model folder.

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
    modality = card.input_modality()
    processor, encoder = card_family(model_dir, card).load(
        model_dir / "encoder", modality.name, card
    )
    model = Classifier(encoder, len(card.labels), card.head_inputs(encoder.hidden_size))
    model.head.load_state_dict(load_file(str(model_dir / "head.safetensors")))
    return processor, model.eval(), card


def _run(
    module: nn.Module,
    processor: Any,
    card: ModelCard,
    inputs: Any,
    batch_size: int,
    precision: str,
    description: str,
) -> np.ndarray:
    """``module`` (the classifier or its encoder) applied to the card's inputs, in order."""
    modality = card.input_modality()
    inputs = modality.paired(inputs, card.pair)
    return modality.run(module, processor, inputs, card, batch_size, precision, description)


def _outputs(
    model: Classifier,
    processor: Any,
    card: ModelCard,
    inputs: Any,
    batch_size: int,
    precision: str,
) -> np.ndarray:
    """The classifier's head outputs for the card's inputs, in order; a pair model's are its
    encoder's pair features of both texts through its head (a cross-encoder's: the whole
    model on both texts at once)."""
    if not card.pair or card.cross_encoder:
        return _run(model, processor, card, inputs, batch_size, precision, "predict")
    features = _run(model.encoder, processor, card, inputs, batch_size, precision, "predict")
    head = model.head
    with torch.no_grad():
        x = torch.from_numpy(features).to(head.weight.device, head.weight.dtype)
        return head(x).float().cpu().numpy()


def predict_proba(
    model: Classifier,
    tokenizer: Any,
    card: ModelCard,
    inputs: list[str] | np.ndarray,
    batch_size: int = 128,
    precision: str = "fp32",
) -> np.ndarray:
    """Class probabilities [inputs, labels] in input order.

    ``inputs`` are texts for a text model, uint8 images [N, H, W, C] for an image model.
    """
    return card.probabilities(_outputs(model, tokenizer, card, inputs, batch_size, precision))


def embed(
    model: Classifier,
    tokenizer: Any,
    card: ModelCard,
    inputs: list[str] | TextPairs | np.ndarray,
    batch_size: int = 128,
    precision: str = "fp32",
) -> np.ndarray:
    """The classifier's encoder outputs [inputs, hidden] (the features its head reads; text
    pairs: their pair_features [inputs, 4 × hidden])."""
    return _run(model.encoder, tokenizer, card, inputs, batch_size, precision, "embed")
