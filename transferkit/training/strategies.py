"""What each transfer strategy trains, and at which learning rate.

Every strategy that trains through the backbone uses the same loop
(``transferkit.training.finetune``); they differ only in which parameters move:

- ``full_finetune``: all of them, with optional layer-wise learning-rate decay;
- ``partial_finetune``: the top N encoder blocks (and what follows them) plus the head, with
  optional layer-wise learning-rate decay; the embeddings and lower blocks are frozen;
- ``lora``: low-rank adapters on the chosen linear layers plus the head (PEFT), merged into
  the weights after training so that serving needs no PEFT;
- ``scratch``: all of them, from a random initialisation of the same architecture.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from transferkit.config import (
    FullFinetuneConfig,
    LoraConfig,
    PartialFinetuneConfig,
    PipelineConfig,
    ScratchConfig,
)
from transferkit.errors import TrainingError
from transferkit.training.model import ImageClassifier, TextClassifier

Classifier = TextClassifier | ImageClassifier

log = logging.getLogger(__name__)

TunedStrategy = FullFinetuneConfig | PartialFinetuneConfig | LoraConfig | ScratchConfig


def encoder_blocks(body: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList in the model.

    BERT keeps it at ``encoder.layer``, GPT-2 at ``h``, Llama at ``layers``; looking for the
    longest list finds each without a table of architectures.
    """
    from transferkit.backbones.vision import ResNetCifar

    if isinstance(body, ResNetCifar):  # its stages are Sequentials; the stem counts as input
        return nn.ModuleList([*body.layer1, *body.layer2, *body.layer3])
    lists = [m for m in body.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TrainingError(
            f"{type(body).__name__} has no stack of blocks to freeze; use full_finetune or lora"
        )
    return max(lists, key=len)


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


def _groups(
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
    strategy: FullFinetuneConfig | PartialFinetuneConfig,
    lr: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimiser groups block by block, with layer-wise learning-rate decay.

    ``partial_finetune`` freezes the embeddings and all but the top ``train_top_layers``
    blocks; ``full_finetune`` trains everything, the embeddings one decay step below the lowest
    block. What follows the blocks (final norms) trains at the full rate.
    """
    body = model.encoder.body
    blocks = encoder_blocks(body)
    full = isinstance(strategy, FullFinetuneConfig)
    keep = (
        min(strategy.train_top_layers, len(blocks))
        if isinstance(strategy, PartialFinetuneConfig)
        else len(blocks)
    )
    decay = strategy.layerwise_lr_decay
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
    groups = _groups(after, lr, weight_decay)
    for index, named in per_block.items():
        depth = len(blocks) - 1 - index  # 0 for the top block
        groups += _groups(named, lr * decay**depth, weight_decay)
    groups += _groups(before, lr * decay ** len(blocks), weight_decay)
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


def add_lora(model: TextClassifier, strategy: LoraConfig) -> None:
    """Wrap the backbone with PEFT LoRA adapters; only the adapters stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # The model's own pooler is never used (TextEncoder pools token states): no adapters there.
    unused = [name for name, _ in model.encoder.body.named_modules() if name.startswith("pooler")]
    peft_config = PeftLoraConfig(
        exclude_modules=unused or None,
        r=strategy.rank,
        lora_alpha=strategy.alpha,
        lora_dropout=strategy.dropout,
        target_modules=strategy.target_modules,
        bias="none",
    )
    try:
        model.encoder.body = get_peft_model(model.encoder.body, peft_config)
    except ValueError as exc:
        raise TrainingError(
            f"strategy.target_modules {strategy.target_modules} match no layer of the "
            f"backbone ({' '.join(str(exc).split())[:120]}); name its linear layers"
        ) from None


def merge_lora(model: TextClassifier) -> None:
    """Fold the adapters into the base weights: the saved encoder is a plain HF model."""
    model.encoder.body = model.encoder.body.merge_and_unload()  # type: ignore[operator]


def parameter_groups(
    model: Classifier, strategy: TunedStrategy, config: PipelineConfig
) -> list[dict[str, Any]]:
    """Prepare ``model`` for ``strategy`` (freeze, wrap) and return its optimiser groups."""
    lr = config.training.learning_rate
    weight_decay = config.training.weight_decay
    head_lr = lr * getattr(strategy, "head_lr_multiplier", 1.0)
    head = [{"params": list(model.head.parameters()), "weight_decay": 0.0, "lr": head_lr}]
    if isinstance(strategy, PartialFinetuneConfig):
        return block_groups(model, strategy, lr, weight_decay) + head
    if isinstance(strategy, FullFinetuneConfig) and strategy.layerwise_lr_decay < 1:
        return block_groups(model, strategy, lr, weight_decay) + head
    if isinstance(strategy, LoraConfig):
        assert isinstance(model, TextClassifier)  # config validation keeps LoRA to text
        add_lora(model, strategy)
        return _groups(list(model.encoder.body.named_parameters()), lr, 0.0) + head
    return _groups(list(model.encoder.body.named_parameters()), lr, weight_decay) + head
