"""Tiny random-weight GPT-style decoders in their real Hugging Face formats, built offline.

- GPT-2: ``GPT2LMHeadModel`` (tied LM head, Conv1D projections, learned positions) with a
  byte-level BPE tokenizer saved as GPT-2's (``vocab.json``, ``merges.txt``): no pad token,
  ``<|endoftext|>`` as BOS/EOS/UNK, as the real one.
- Llama: ``LlamaForCausalLM`` (untied LM head, RoPE, RMSNorm, GQA) with a BPE tokenizer that
  prepends ``<s>``, no pad token and left padding declared, as Llama tokenizers do.

Plus a learnable synthetic task whose label is the last of two keywords (see
``synthetic_texts``): features of the last real token classify it, a mean over the tokens,
the first token or a pad slot cannot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

_FILLER_WORDS = (
    "the a of and to in is was it for on with as at by this that from or an be are were some "
    "many very quite just then also here there when where which while after before"
)
FILLER = tuple(_FILLER_WORDS.split())
KEYWORDS = {
    0: ("apple", "pear", "plum", "fig"),
    1: ("train", "truck", "boat", "plane"),
}
HIDDEN = 48


def synthetic_texts(count: int, seed: int, first: bool = False) -> tuple[list[str], np.ndarray]:
    """``count`` texts whose label is the last keyword mentioned (``first``: the first).

    Filler words, a keyword, more filler, then a keyword. Label last: the first keyword is of
    the other label, so every text holds one keyword of each and only order tells them apart;
    the last real token of even a random decoder knows the answer, a mean over the tokens, the
    first token or a pad slot does not. Label first: the last keyword is of either label, at
    random; the last token must learn to look back for the first: frozen random features
    cannot, fine-tuning through them can.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    texts = []
    for label in labels:
        early, late = (int(label), int(rng.integers(0, 2))) if first else (1 - label, label)
        words = [
            *rng.choice(FILLER, rng.integers(1, 7)),
            rng.choice(KEYWORDS[early]),
            *rng.choice(FILLER, rng.integers(0, 5)),
            rng.choice(KEYWORDS[late]),
        ]
        texts.append(" ".join(str(w) for w in words))
    return texts, labels


def corpus() -> list[str]:
    """Every word of the task, for training the tokenizers."""
    words = [*FILLER, *(w for ws in KEYWORDS.values() for w in ws)]
    return [" ".join(words), *synthetic_texts(400, 99)[0]]


def _gpt2_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = GPT2Tokenizer(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.save_pretrained(folder)


def _llama_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    fast.save_pretrained(folder)


def _save(folder: Path, seed: int, tokenizer: Any, model: Any, config: Any, **sizes: Any) -> Path:
    """Tokenizer first (the vocabulary's size sets the model's), then seeded random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(seed)
    model(config(vocab_size=len(vocab), **sizes)).save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """A GPT-2 folder: 2 layers, n_embd 48, its tokenizer; safetensors weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return _save(
        folder, seed, _gpt2_tokenizer, GPT2LMHeadModel, GPT2Config,
        n_positions=64, n_embd=HIDDEN, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A Llama folder: 2 layers, hidden 48, GQA, untied LM head, its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save(
        folder, seed, _llama_tokenizer, LlamaForCausalLM, LlamaConfig,
        hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip
