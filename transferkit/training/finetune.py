"""Full fine-tuning: backbone and head trained together.

AdamW (no decay on biases and LayerNorm), linear warm-up then linear decay, gradient
clipping, dynamic padding over length-grouped batches, bf16 autocast where the hardware has
it, validation every epoch (or every N steps) with early stopping, and the best checkpoint
restored at the end.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from transferkit.backbones.text import autocast, pad, run_batched, tokenize
from transferkit.config import PipelineConfig
from transferkit.errors import TrainingError
from transferkit.metrics import score
from transferkit.training.model import TextClassifier

log = logging.getLogger(__name__)


class FinetuneHistory(BaseModel):
    """What happened during fine-tuning."""

    steps: int
    epochs_run: float
    best_step: int
    best_validation_metric: float
    validations: list[dict[str, float]]
    stopped_early: bool
    examples_per_second: float
    train_seconds: float


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


def _optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    # The fused kernel updates all 22M parameters of a MiniLM in ~10 ms on a 2-core CPU,
    # against ~120 ms for the default multi-tensor path.
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=True)


def linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float) -> Any:
    """Linear warm-up over ``warmup_ratio`` of ``total`` steps, then linear decay to zero."""
    warmup = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_gradients(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    parameters: Any,
    max_norm: float,
) -> None:
    """One optimisation step: backward, clip the gradient norm, update, advance the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()
    scheduler.step()


def finetune(
    model: TextClassifier,
    tokenizer: Any,
    config: PipelineConfig,
    train: tuple[list[str], np.ndarray],
    validation: tuple[list[str], np.ndarray],
    labels: list[str],
    groups: list[dict[str, Any]],
    precision: str,
    max_length: int,
) -> FinetuneHistory:
    """Fine-tune ``model`` in place; it holds the best validation checkpoint on return.

    ``groups`` are the optimiser's parameter groups (what trains, at which rate and weight
    decay), as ``transferkit.training.strategies.parameter_groups`` builds them.

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    cfg = config.training
    metric = config.evaluation.primary_metric
    device = next(model.parameters()).device
    rng = np.random.default_rng(cfg.seed)
    ids = tokenize(tokenizer, train[0], max_length)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    targets = torch.as_tensor(train[1], dtype=torch.long)
    pad_id = tokenizer.pad_token_id or 0

    steps_per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    total = min(total, steps_per_epoch * cfg.epochs)
    eval_every = cfg.eval_every_steps or steps_per_epoch
    optimizer = _optimizer(groups)
    scheduler = linear_schedule(optimizer, total, cfg.warmup_ratio)

    validate_seconds = 0.0

    def validate() -> float:
        nonlocal validate_seconds
        t0 = time.perf_counter()
        logits = run_batched(
            model,
            tokenizer,
            validation[0],
            max_length,
            config.evaluation.batch_size,
            precision,
            "validate",
        )
        validate_seconds += time.perf_counter() - t0
        return score(validation[1], logits.argmax(axis=1), labels).metric(metric)

    started = time.perf_counter()
    best_value = validate()
    best_state = copy.deepcopy(model.state_dict())
    best_step = 0
    validations = [{"step": 0.0, metric: best_value}]
    log.info("step 0: validation %s %.4f (starting point)", metric, best_value)
    stale = 0
    step = 0
    seen = 0
    stopped_early = False
    window_loss, window_count = 0.0, 0
    while step < total and not stopped_early:
        model.train()
        for batch in length_grouped_batches(lengths, cfg.batch_size, rng):
            input_ids, mask = pad([ids[i] for i in batch], pad_id)
            with autocast(precision, device):
                logits = model(input_ids.to(device), mask.to(device))
            loss = nn.functional.cross_entropy(logits.float(), targets[batch].to(device))
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at step {step}; lower training.learning_rate "
                    "or use training.precision: fp32"
                )
            apply_gradients(loss, optimizer, scheduler, model.parameters(), cfg.max_grad_norm)
            step += 1
            seen += len(batch)
            window_loss += loss.item()
            window_count += 1
            if step % max(eval_every // 4, 1) == 0:
                elapsed = time.perf_counter() - started - validate_seconds
                log.info(
                    "step %d/%d: loss %.4f, %.0f examples/s",
                    step,
                    total,
                    window_loss / window_count,
                    seen / max(elapsed, 1e-9),
                )
                window_loss, window_count = 0.0, 0
            if step % eval_every == 0 or step == total:
                value = validate()
                model.train()
                validations.append({"step": float(step), metric: value})
                log.info("step %d: validation %s %.4f", step, metric, value)
                if value > best_value:
                    best_value, best_step, stale = value, step, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
                    if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
                        log.info("early stopping: %d validations without improvement", stale)
                        stopped_early = True
                        break
            if step >= total:
                break
    train_seconds = time.perf_counter() - started - validate_seconds
    model.load_state_dict(best_state)
    model.eval()
    return FinetuneHistory(
        steps=step,
        epochs_run=round(seen / max(len(ids), 1), 3),
        best_step=best_step,
        best_validation_metric=best_value,
        validations=validations,
        stopped_early=stopped_early,
        examples_per_second=round(seen / max(train_seconds, 1e-9), 1),
        train_seconds=round(train_seconds, 1),
    )
