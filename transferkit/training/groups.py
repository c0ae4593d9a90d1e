"""Optimiser parameter groups: which parameters move, and at which learning rate.

The strategies that train through the backbone (``transferkit.training.strategies``: full,
partial, LoRA, scratch) share one loop and differ only in the groups they build from these
pieces: every parameter at one rate, blocks with layer-wise decay above a frozen bottom, or
LoRA adapters (PEFT, merged into the weights after training so serving needs no PEFT).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from transferkit.config import LoraConfig, PipelineConfig
from transferkit.errors import TrainingError
from transferkit.training.model import Classifier

log = logging.getLogger(__name__)


def _split_decay(
    named: list[tuple[str, nn.Parameter]],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in named:
        if parameter.requires_grad:
            is_norm = parameter.ndim < 2 or "norm" in name.lower()
            (no_decay if is_norm else decay).append(parameter)
    return decay, no_decay


def decay_groups(
    named: list[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and normalisation weights."""
    decay, no_decay = _split_decay(named)
    return [
        g
        for g in (
            {"params": decay, "weight_decay": weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        )
        if g["params"]
    ]


def block_groups(
    model: Classifier,
    keep: int | None,
    decay: float,
    lr: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimiser groups block by block, with layer-wise learning-rate decay.

    ``keep`` blocks from the top are trained and the embeddings and lower blocks frozen
    (partial fine-tuning); ``keep`` None trains everything, the embeddings one decay step
    below the lowest block (full fine-tuning). What follows the blocks (final norms) trains
    at the full rate. The blocks are the family's (``Encoder.blocks``).
    """
    body = model.encoder.body
    blocks = model.encoder.blocks()
    if not blocks:
        raise TrainingError(
            f"{type(body).__name__} has no stack of blocks to freeze; use full_finetune or lora"
        )
    full = keep is None
    keep = len(blocks) if keep is None else min(keep, len(blocks))
    block_of: dict[int, int] = {}
    for index, block in enumerate(blocks):
        for parameter in block.parameters():
            block_of[id(parameter)] = index
    first_trained = len(blocks) - keep
    seen_blocks = False
    before: list[tuple[str, nn.Parameter]] = []
    after: list[tuple[str, nn.Parameter]] = []
    per_block: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, parameter in body.named_parameters():
        found = block_of.get(id(parameter))
        if found is not None:
            index = found
            seen_blocks = True
            parameter.requires_grad = parameter.requires_grad and index >= first_trained
            if parameter.requires_grad:
                per_block.setdefault(index, []).append((name, parameter))
            continue
        # Registration order: embeddings come before the blocks, final norms after them.
        # (parameters frozen already, like an unused pooler, stay frozen)
        if not seen_blocks:
            parameter.requires_grad = parameter.requires_grad and full
            if parameter.requires_grad:
                before.append((name, parameter))
        else:
            parameter.requires_grad = parameter.requires_grad and keep > 0
            if parameter.requires_grad:
                after.append((name, parameter))
    groups = decay_groups(after, lr, weight_decay)
    for index, named in per_block.items():
        depth = len(blocks) - 1 - index  # 0 for the top block
        groups += decay_groups(named, lr * decay**depth, weight_decay)
    groups += decay_groups(before, lr * decay ** len(blocks), weight_decay)
    if full:
        log.info(
            "full fine-tuning, layer-wise learning-rate decay %.3g over %d blocks (embeddings "
            "at %.3g× the top rate)",
            decay,
            len(blocks),
            decay ** len(blocks),
        )
    else:
        log.info(
            "partial fine-tuning: top %d of %d blocks trained, the rest frozen", keep, len(blocks)
        )
    return groups


def add_lora(model: Classifier, strategy: LoraConfig, targets: list[str]) -> None:
    """Wrap the backbone with PEFT LoRA adapters on ``targets``; only the adapters (and the
    head) stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # The model's own pooler is never used (encoders pool token states): no adapters there.
    unused = [name for name, _ in model.encoder.body.named_modules() if name.startswith("pooler")]
    peft_config = PeftLoraConfig(
        exclude_modules=unused or None,
        r=strategy.rank,
        lora_alpha=strategy.alpha,
        lora_dropout=strategy.dropout,
        target_modules=targets,
        bias="none",
    )
    try:
        model.encoder.body = get_peft_model(model.encoder.body, peft_config)
    except ValueError as exc:
        raise TrainingError(
            f"strategy.target_modules {targets} match no layer of the "
            f"backbone ({' '.join(str(exc).split())[:120]}); name its linear layers"
        ) from None


def merge_lora(model: Classifier) -> None:
    """Fold the adapters into the base weights: the saved encoder is a plain model."""
    model.encoder.body = model.encoder.body.merge_and_unload()  # type: ignore[operator]


def head_group(model: Classifier, strategy: Any, config: PipelineConfig) -> list[dict[str, Any]]:
    """The head's group: no weight decay, the learning rate × ``head_lr_multiplier``."""
    lr = config.training.learning_rate * getattr(strategy, "head_lr_multiplier", 1.0)
    return [{"params": list(model.head.parameters()), "weight_decay": 0.0, "lr": lr}]


def body_groups(
    model: Classifier, config: PipelineConfig, weight_decay: float | None = None
) -> list[dict[str, Any]]:
    """Every trainable body parameter at the learning rate (no decay on norms and biases)."""
    wd = config.training.weight_decay if weight_decay is None else weight_decay
    return decay_groups(
        list(model.encoder.body.named_parameters()), config.training.learning_rate, wd
    )
