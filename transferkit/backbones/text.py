"""Text encoders: a Hugging Face transformer plus pooling, and fast batched encoding.

Encoding sorts texts by token length so each batch pads to its own longest text (SST-2
averages 13 tokens; padding everything to 128 would waste ~90% of the work), runs under
``torch.inference_mode`` with bf16 autocast where the hardware has native bf16, and restores
the caller's order in the returned array.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.backbones.compiled import CompiledEncoder, compile_encoder, wanted
from transferkit.devices import autocast, bf16_supported, resolve_precision
from transferkit.progress import progress

__all__ = ["autocast", "bf16_supported", "resolve_precision"]  # re-exported: older imports

log = logging.getLogger(__name__)


# Texts, or pairs of texts that a cross-encoder reads together.
Texts = list[str] | list[tuple[str, str]]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """Token states [B, T, H] → one float32 vector per text [B, H]."""
    hidden = hidden.float()
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "last":
        # The last real token, whichever side the padding is on: a decoder's summary of the
        # text (its causal attention lets only that position see every token).
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask.bool()).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    elif pooling == "max":
        pooled = hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class TextEncoder(nn.Module):
    """A transformer body plus pooling: texts' token ids → sentence vectors."""

    def __init__(self, body: nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.body = body
        self.pooling = pooling
        self.normalize = normalize
        # Pooling reads the token states; a model's own pooler head (BERT's) is never used,
        # so it must neither train nor count as trainable.
        for name, parameter in body.named_parameters():
            if name.startswith("pooler."):
                parameter.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.body.config.hidden_size)  # type: ignore[union-attr, arg-type]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling, self.normalize)


# Texts of three lengths that a compiled encoder must embed as the torch module does.
CHECK_TEXTS = [
    "A check.",
    "A somewhat longer text to check the compiled encoder with, padded.",
    "x",
]


def frozen_encoder(
    encoder: nn.Module, precision: str, tokenizer: Any = None, runtime: str = "torch"
) -> tuple[nn.Module | CompiledEncoder, str]:
    """The fastest form of a frozen encoder for inference at ``precision``.

    With ``runtime='openvino'`` (see ``runtime_for``) and its tokenizer, the encoder compiled
    by OpenVINO (compiled.py), unless that fails (logged). Otherwise a torch module:

    bf16: the weights themselves are cast to bf16 (autocast would re-cast every weight on
    every batch), and on a CPU attention runs as plain matrix products, faster than the fused
    kernel on sentence-length inputs. Pooling still sums in float32. Returns the module and
    the precision to run it at ('fp32': nothing left for autocast to do). The encoder itself
    is changed in place: use it only for inference afterwards.

    Measured on 20,000 SST-2 sentences (bench/extract.py): cosine similarity to fp32 ≥ 0.999
    for every sentence; about 15% faster than autocast on a 2-core AVX-512 CPU.
    """
    if runtime == "openvino" and tokenizer is not None:
        ids = tokenize(tokenizer, CHECK_TEXTS, 32)
        check = (np.arange(len(ids)), *pad(ids, tokenizer.pad_token_id or 0))
        fast = compile_encoder(encoder.float().eval(), check, precision)
        if fast is not None:
            return fast, "fp32"  # its precision is compiled in: nothing left for autocast
    if precision != "bf16":
        return encoder, precision
    encoder.to(torch.bfloat16)
    if next(encoder.parameters()).device.type == "cpu":
        with contextlib.suppress(AttributeError, ValueError):  # older transformers
            encoder.body.set_attn_implementation("eager")  # type: ignore[operator, union-attr]
    return encoder, "fp32"


def runtime_for(device: torch.device, precision: str, texts: int) -> str:
    """The runtime that extracts ``texts`` texts fastest here: 'openvino' or 'torch'."""
    return "openvino" if wanted(device, precision, texts) else "torch"


def tokenize(tokenizer: Any, texts: Texts, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, without padding; a pair of texts
    (a cross-encoder's input) is tokenised as one sequence, with the tokenizer's separators
    and the longer text truncated first.

    A fast (Rust) tokenizer is asked directly, through a copy set up as transformers sets up
    its own for ``tokenizer(texts, truncation=True, max_length=...)``: the same ids without
    the per-text Python dictionaries transformers builds around them (68,000 SST-2 texts:
    1.8 s instead of 3.7 s on a 2-core CPU).
    """
    backend = _truncating_backend(tokenizer, max_length)
    if backend is None:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch(texts)]


# Per tokenizer (weakly held), then per max length, truncation side and special-token
# splitting (a caller may change the last two): its backend's copy set up for them.
_BACKENDS: weakref.WeakKeyDictionary[Any, dict[tuple[int, str, bool], Any]] = (
    weakref.WeakKeyDictionary()
)


def _truncating_backend(tokenizer: Any, max_length: int) -> Any | None:
    """A copy of ``tokenizer``'s Rust backend that truncates as transformers' call does
    (longest first, the tokenizer's truncation side) and never pads; None for a tokenizer
    without one (a slow, Python tokenizer) or one that cannot be held weakly."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:
        return None
    try:
        copies = _BACKENDS.setdefault(tokenizer, {})
    except TypeError:
        return None
    key = (
        max_length,
        tokenizer.truncation_side,
        bool(getattr(tokenizer, "split_special_tokens", False)),
    )
    if key not in copies:
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.enable_truncation(max_length, stride=0, strategy="longest_first", direction=key[1])
        copy.encode_special_tokens = key[2]
        copies[key] = copy
    return copies[key]


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Index batches, longest texts first, so each batch pads only to its own maximum."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` tensors."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max())
    mask = np.arange(width) < lengths[:, None]
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    # A boolean mask assigns in row-major order: row by row, each row's ids in order.
    input_ids[mask] = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())
    )
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))


# Texts tokenised, sorted and encoded at a time by encode_chunks: bounds the memory of token
# ids and vectors (a million texts would otherwise hold ~1 GB of id lists and 1.5 GB of
# vectors at once) while each chunk is still long enough for length sorting to pad little.
CHUNK_TEXTS = 32_768


@torch.inference_mode()
def encode_chunks(
    module: nn.Module | CompiledEncoder,
    tokenizer: Any,
    texts: Texts,
    max_length: int,
    batch_size: int = 128,
    precision: str = "fp32",
    description: str = "encode",
    chunk_texts: int | None = None,
) -> Iterator[np.ndarray]:
    """Apply ``module(input_ids, attention_mask) → [batch, width]`` to texts, chunk by chunk.

    Texts are taken ``chunk_texts`` at a time in input order; within a chunk they are
    tokenised, encoded in length-sorted batches and put back in input order, so the chunks
    concatenated are the rows of ``texts`` in order.

    Args:
        module: maps padded token ids and mask to one row per text (a torch module is put in
            eval mode here; a CompiledEncoder runs its batches on its own streams).
        tokenizer: the backbone's tokenizer.
        texts: input texts.
        max_length: truncation length in tokens.
        batch_size: texts per forward pass.
        precision: 'bf16' (autocast) or 'fp32'.
        description: label for progress output.
        chunk_texts: texts held tokenised at once (unset: ``CHUNK_TEXTS``).

    Yields:
        float32 arrays [min(chunk_texts, rest), width], in input order.
    """
    if isinstance(module, CompiledEncoder):
        device, run = torch.device("cpu"), module.run_batches
    else:
        device = next(module.parameters()).device
        run = functools.partial(_apply, module.eval(), device)
    pad_id = tokenizer.pad_token_id or 0
    chunk_texts = chunk_texts or CHUNK_TEXTS
    starts = range(0, len(texts), chunk_texts)
    total = sum(math.ceil(min(chunk_texts, len(texts) - s) / batch_size) for s in starts)
    done = progress(range(total), total, description)

    def chunk(start: int) -> np.ndarray:
        ids = tokenize(tokenizer, texts[start : start + chunk_texts], max_length)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        out: np.ndarray | None = None
        batches = (
            (index, *pad([ids[i] for i in index], pad_id))
            for index in length_sorted_batches(lengths, batch_size)
        )
        # Entered per chunk, not around the yields: the caller's code between chunks must not
        # run under this autocast.
        with autocast(precision, device):
            for index, rows in run(batches):
                if out is None:
                    out = np.zeros((len(ids), rows.shape[1]), dtype=np.float32)
                out[index] = rows
                next(done, None)
        assert out is not None
        return out

    for start in starts:
        yield chunk(start)
    for _ in done:  # finish the progress display
        pass


def _apply(
    module: nn.Module,
    device: torch.device,
    batches: Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each batch's row indices and the module's float32 rows for it."""
    for index, input_ids, mask in batches:
        yield index, module(input_ids.to(device), mask.to(device)).float().cpu().numpy()


def pair_features(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The features of text pairs from their two embeddings [rows, width] each: [u, v,
    |u - v|, u * v] of the unit-length u and v (Sentence-BERT's classification input,
    Reimers & Gurevych 2019), float32 [rows, 4 × width]. Unit length makes the last block
    sum to the cosine of the two texts (the zero-shot similarity)."""
    features = pair_tensor(torch.from_numpy(first).float(), torch.from_numpy(second).float())
    return features.numpy()


def pair_tensor(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``pair_features`` of two embedding tensors, differentiable (a bi-encoder's training)."""
    u = first / first.norm(dim=1, keepdim=True).clamp_min(1e-12)
    v = second / second.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


def run_batched(
    module: nn.Module,
    tokenizer: Any,
    texts: Texts,
    max_length: int,
    batch_size: int = 128,
    precision: str = "fp32",
    description: str = "encode",
) -> np.ndarray:
    """Apply ``module(input_ids, attention_mask) → [batch, width]`` to texts, in input order.

    Used for sentence vectors (a TextEncoder) and for class logits (a classifier) alike; the
    whole result in memory (``encode_chunks`` streams it).

    Returns:
        float32 array [len(texts), width] ([0, 0] for no texts).
    """
    chunks = list(
        encode_chunks(module, tokenizer, texts, max_length, batch_size, precision, description)
    )
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
