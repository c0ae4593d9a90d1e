"""BERT-like text encoders: BERT, RoBERTa, DistilBERT, MPNet, DeBERTa, ELECTRA, MiniLM …,
including sentence-transformers folders (their pooling and normalisation are read from
``1_Pooling/config.json`` and ``modules.json``).

The generic text family: any folder with a tokenizer that no more specific family claims.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.backbones.base import (
    Capabilities,
    Defaults,
    Encoder,
    Family,
    Settings,
    checked_pretrained,
    model_types,
    register,
)
from transferkit.backbones.text import TextEncoder

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# LoRA targets by model_type: the attention query and value projections (Hu et al. 2021)
# under each architecture's own names.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "distilbert": ("q_lin", "v_lin"),
    "mpnet": ("q", "v"),
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    "modernbert": ("Wqkv",),
}
DEFAULT_TARGETS = ("query", "value")


def has_tokenizer(files: set[str]) -> bool:
    """Whether a folder's files include a tokenizer."""
    return any(name.endswith(TOKENIZER_FILES) for name in files)


def sentence_transformers_head(model_dir: Path) -> tuple[str | None, bool]:
    """Pooling and normalisation declared by a sentence-transformers folder, if any."""
    pooling = None
    pooling_config = model_dir / "1_Pooling" / "config.json"
    if pooling_config.exists():
        modes = json.loads(pooling_config.read_text())
        for key, name in (
            ("pooling_mode_cls_token", "cls"),
            ("pooling_mode_max_tokens", "max"),
            ("pooling_mode_mean_tokens", "mean"),
            ("pooling_mode_lasttoken", "last"),
        ):
            if modes.get(key):
                pooling = name
    normalize = False
    modules = model_dir / "modules.json"
    if modules.exists():
        normalize = any(
            m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text())
        )
    return pooling, normalize


def text_blocks(body: nn.Module) -> list[nn.Module]:
    """The stack of transformer blocks: the longest ModuleList in the model.

    BERT keeps it at ``encoder.layer``, GPT-2 at ``h``, Llama at ``layers``; looking for the
    longest list finds each without a table of architectures.
    """
    lists = [list(m) for m in body.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else []


class HFTextEncoder(TextEncoder, Encoder):
    """A Hugging Face text model plus pooling (see ``TextEncoder``)."""

    def blocks(self) -> list[nn.Module]:
        return text_blocks(self.body)


def load_hf_text(
    model_dir: Path, settings: Settings, random_init: bool, encoder: type[TextEncoder]
) -> tuple[Any, TextEncoder]:
    """Tokenizer and text encoder of a Hugging Face folder (offline, safetensors only).

    fp32 master weights whatever the checkpoint's dtype: transformers 5 would otherwise keep a
    half-precision checkpoint in half precision, and fine-tuning such weights diverges. Speed
    comes from autocast, not from the stored dtype.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if random_init:
        body = AutoModel.from_config(
            AutoConfig.from_pretrained(model_dir, local_files_only=True), dtype=torch.float32
        )
    else:
        # Every weight present (a missing one would be left random); the pooler is never read.
        body = checked_pretrained(model_dir, unused_ok=("pooler.",))
    return tokenizer, encoder(body, settings.pooling, settings.normalize)


def load_text_encoder(model_dir: Path, pooling: str, normalize: bool) -> tuple[Any, HFTextEncoder]:
    """Tokenizer and encoder of a BERT-like folder (offline, safetensors only)."""
    tokenizer, encoder = load_hf_text(model_dir, Defaults(pooling, normalize), False, HFTextEncoder)
    assert isinstance(encoder, HFTextEncoder)
    return tokenizer, encoder


def random_text_encoder(
    model_dir: Path, pooling: str, normalize: bool
) -> tuple[Any, HFTextEncoder]:
    """Tokenizer and a randomly initialised encoder of the same architecture (the control).

    Initialisation draws from torch's global generator: seed it first.
    """
    tokenizer, encoder = load_hf_text(model_dir, Defaults(pooling, normalize), True, HFTextEncoder)
    assert isinstance(encoder, HFTextEncoder)
    return tokenizer, encoder


class TextEncoderFamily(Family):
    """BERT-like encoders: mean/CLS pooling, MLM domain adaptation, SetFit, zero-shot."""

    name = "encoder"
    title = "BERT-like encoder"
    modalities = ("text",)
    priority = 90  # the generic text family: after every specific one

    def detect(self, hf_config: dict[str, Any], files: set[str]) -> bool:
        return has_tokenizer(files)

    def capabilities(self, modality: str, hf_config: dict[str, Any]) -> Capabilities:
        model_type, _ = model_types(hf_config)
        return Capabilities(
            lora_targets=LORA_TARGETS.get(model_type, DEFAULT_TARGETS),
            zero_shot=True,
            contrastive=True,
            adaptation="mlm",
        )

    def default_pooling(self, model_dir: Path) -> tuple[str, bool]:
        pooling, normalize = sentence_transformers_head(model_dir)
        return pooling or "mean", normalize

    def load(
        self, model_dir: Path, modality: str, settings: Settings, random_init: bool = False
    ) -> tuple[Any, Encoder]:
        tokenizer, encoder = load_hf_text(model_dir, settings, random_init, HFTextEncoder)
        assert isinstance(encoder, HFTextEncoder)
        return tokenizer, encoder

    def prompt_encoder(
        self, model_dir: Path, modality: str, settings: Settings
    ) -> tuple[Any, Encoder]:
        # Prototypes are compared by cosine: the same encoder, its vectors normalised.
        tokenizer, encoder = load_hf_text(model_dir, settings, False, HFTextEncoder)
        encoder.normalize = True
        assert isinstance(encoder, HFTextEncoder)
        return tokenizer, encoder


register(TextEncoderFamily())
