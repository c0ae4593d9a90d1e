"""Domain adaptation of decoders: continued causal-language-model training on unlabelled text.

The decoder keeps learning its pre-training task (predict each next token) on text from the
target domain before any labelled training (DAPT/TAPT, Gururangan et al. 2020). A causal LM
ships with its LM head (tied to the embeddings or not), so unlike MLM adaptation of sentence
encoders no head warm-up is needed; only a folder saved without its untied head (a bare
``LlamaModel``) gets one, ``head_warmup_steps`` on the frozen body first. The held-out
next-token loss on target text is measured before and after: the drop is the adaptation.

The result is an ordinary backbone artifact (``model/`` + ``backbone.json`` with a new
fingerprint) in the causal-LM layout, as the fetched folder usually is: ``AutoModel`` and so
``DecoderFamily.load`` read its body back, and the LM head stays for a further adaptation.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit import storage
from transferkit.backbones import BackboneInfo
from transferkit.backbones.base import quiet_transformers
from transferkit.backbones.decoder import (
    hidden_size,
    num_layers,
    set_pad_token,
)
from transferkit.backbones.text import autocast, pad, tokenize
from transferkit.config import DomainAdaptationConfig, StorageConfig
from transferkit.errors import DataError, TrainingError
from transferkit.progress import progress
from transferkit.training.domain import WEIGHT_SUFFIXES, read_unlabelled
from transferkit.training.finetune import apply_gradients, linear_schedule

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input ids, attention mask, labels


def batch_of(ids: list[list[int]], pad_id: int) -> Batch:
    """Right-padded ids, mask and next-token labels (-100 on padding; the model shifts)."""
    input_ids, mask = pad(ids, pad_id)
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def predicted_tokens(labels: torch.Tensor) -> int:
    """Tokens a batch asks the model to predict: every real token after a text's first."""
    return int((labels[:, 1:] != -100).sum())


def causal_loss(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch, by the model's own loss (its logit scaling
    and soft-capping included)."""
    input_ids, mask, labels = (t.to(device) for t in batch)
    return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss


def held_out_loss(
    model: nn.Module, batches: list[Batch], device: torch.device, precision: str
) -> float:
    """Mean next-token loss over every predicted token of ``batches``."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            tokens = predicted_tokens(batch[2])
            if tokens:
                with autocast(precision, device):
                    loss = causal_loss(model, batch, device)
                total += float(loss.float()) * tokens
                count += tokens
    return total / max(count, 1)


def _load_causal_lm(model_dir: Path, info: BackboneInfo) -> tuple[Any, bool]:
    """The causal LM of a folder, fp32, and whether its LM head had to be created."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                model_dir,
                local_files_only=True,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
            )
    except ValueError as exc:
        raise TrainingError(
            f"{info.source} ({info.architecture}) has no causal-language-model form "
            f"({str(exc).splitlines()[0][:120]}); use another strategy"
        ) from None
    model, loading = loaded
    prefix = str(model.base_model_prefix)
    missing = sorted(loading["missing_keys"])
    body = [name for name in missing if name.startswith(prefix)]
    if body:
        raise TrainingError(
            f"{info.source}: the weights have no {body[0]} (1 of {len(body)} missing tensors), "
            "which would be left random; fetch the complete backbone again"
        )
    return model, bool(missing)


def write_adapted_backbone(
    save: Callable[[Path], None], model_dir: Path, info: BackboneInfo, output_dir: Path
) -> None:
    """Write an adapted backbone artifact atomically: ``model/`` and ``backbone.json``.

    ``save`` writes the adapted weights and config into the folder it is given; the source
    folder's other files (tokenizer, sentence-transformers settings) come along. ``info`` is
    the adapted record; its weights' hashes and fingerprint are filled in here. (MLM
    adaptation in ``domain.py`` writes the same layout.)
    """
    with storage.atomic_dir(output_dir) as tmp:
        (tmp / "model").mkdir()
        save(tmp / "model")
        for path in model_dir.rglob("*"):
            copy = tmp / "model" / path.relative_to(model_dir)
            if path.is_file() and not copy.exists() and not path.name.endswith(WEIGHT_SUFFIXES):
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)
        files = {
            p.relative_to(tmp / "model").as_posix(): storage.sha256_file(p)
            for p in sorted((tmp / "model").rglob("*"))
            if p.is_file()
        }
        update: dict[str, Any] = {
            "weights": {n: h for n, h in files.items() if n.endswith(".safetensors")},
            "fingerprint": storage.sha256_tree(tmp / "model", known=files),
        }
        if "files" in type(info).model_fields:  # records that keep every file's hash
            update["files"] = files
        adapted = info.model_copy(update=update)
        storage.write_json(tmp / "backbone.json", adapted.model_dump())


def adapt_causal_lm(
    strategy: DomainAdaptationConfig,
    storage_config: StorageConfig,
    backbone_dir: Path,
    info: BackboneInfo,
    output_dir: Path,
    precision: str,
    seed: int,
    target: torch.device,
) -> dict[str, Any]:
    """Continue causal-LM training of a decoder backbone and write the adapted artifact.

    Args:
        strategy: the domain_adaptation options (corpus, steps, batch size, rate, length).
        storage_config: how to read the corpus URI.
        backbone_dir: the fetch_backbone artifact to adapt.
        info: its ``backbone.json``.
        output_dir: folder to create atomically: ``model/`` and ``backbone.json``.
        precision: 'bf16' or 'fp32' autocast.
        seed: seeds the held-out split, batch order and a created head's initialisation.
        target: where to train.

    Returns:
        Corpus size, steps, and the held-out next-token loss and perplexity before and after.

    Raises:
        DataError: the corpus has too few texts, or texts too short to predict anything.
        TrainingError: the backbone has no causal-LM form, its LM head is missing and
            ``head_warmup_steps`` is 0, or the loss diverged.
    """
    from transformers import AutoTokenizer

    started = time.perf_counter()
    model_dir = backbone_dir / "model"
    texts = read_unlabelled(strategy, storage_config)
    tokenizer = set_pad_token(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    pad_id = tokenizer.pad_token_id or 0
    torch.manual_seed(seed)
    model, head_created = _load_causal_lm(model_dir, info)
    model.to(target)
    if head_created and not strategy.head_warmup_steps:
        raise TrainingError(
            f"{info.source}: the folder has no LM head (saved without it), so it would be "
            "trained from random weights; set strategy.head_warmup_steps above 0"
        )

    rng = np.random.default_rng(seed)
    ids = tokenize(tokenizer, texts, strategy.max_length or info.max_length)
    # A one-token text has no next token to predict: it neither trains nor measures.
    usable = [ids[i] for i in rng.permutation(len(ids)) if len(ids[i]) > 1]
    held_count = min(max(len(usable) // 20, 16), 512)
    if len(usable) < 20:
        raise DataError(
            f"{strategy.unlabelled_uri}: {len(usable)} unlabelled texts are longer than one "
            "token; causal-LM adaptation needs at least 20 (more is better: thousands of "
            "sentences or paragraphs)"
        )
    held, train = usable[:held_count], usable[held_count:]
    held_batches = [
        batch_of(held[i : i + strategy.batch_size], pad_id)
        for i in range(0, len(held), strategy.batch_size)
    ]

    def run(steps: int, parameters: list[nn.Parameter], learning_rate: float, label: str) -> None:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01, fused=True)
        schedule = linear_schedule(optimizer, steps, 0.06)
        losses: list[float] = []
        model.train()
        for step in progress(range(steps), steps, label):
            rows = rng.choice(len(train), size=min(strategy.batch_size, len(train)), replace=False)
            with autocast(precision, target):
                loss = causal_loss(model, batch_of([train[i] for i in rows], pad_id), target)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"causal-LM loss became {loss.item()} at step {step}; lower "
                    "strategy.learning_rate"
                )
            apply_gradients(loss.float(), optimizer, schedule, parameters, 1.0)
            losses.append(loss.item())
            if (step + 1) % max(steps // 10, 1) == 0:
                log.info(
                    "%s step %d/%d: CLM loss %.3f", label, step + 1, steps, np.mean(losses[-20:])
                )

    warmup = strategy.head_warmup_steps if head_created else 0
    if warmup:
        prefix = str(model.base_model_prefix)
        body = {id(p) for n, p in model.named_parameters() if n.startswith(prefix)}
        head = [p for p in model.parameters() if id(p) not in body]
        run(warmup, head, strategy.head_learning_rate, "LM head")
    before = held_out_loss(model, held_batches, target, precision)
    log.info("held-out next-token loss of the original decoder: %.4f", before)
    run(strategy.steps, list(model.parameters()), strategy.learning_rate, "CLM adapt")
    after = held_out_loss(model, held_batches, target, precision)
    log.info("held-out next-token loss after adaptation: %.4f (was %.4f)", after, before)

    write_adapted_backbone(
        lambda folder: model.to("cpu").save_pretrained(folder, safe_serialization=True),
        model_dir,
        info.model_copy(
            update={
                "source": f"{info.source} + CLM on {strategy.unlabelled_uri}",
                "architecture": type(model).__name__,
                "hidden_size": hidden_size(model.config.to_dict()) or info.hidden_size,
                "num_layers": num_layers(model.config.to_dict()) or info.num_layers,
            }
        ),
        output_dir,
    )
    return {
        "objective": "clm",
        "unlabelled_texts": len(texts),
        "held_out_texts": held_count,
        "head_warmup_steps": warmup,
        "steps": strategy.steps,
        "held_out_clm_loss_before": round(before, 4),
        "held_out_clm_loss_after": round(after, 4),
        "held_out_perplexity_before": round(math.exp(min(before, 50)), 2),
        "held_out_perplexity_after": round(math.exp(min(after, 50)), 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
