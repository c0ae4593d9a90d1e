"""Domain adaptation: continued masked-language-model pre-training on unlabelled target text.

The backbone keeps learning its pre-training task (predict masked tokens) on text from the
target domain before any labelled training (DAPT/TAPT, Gururangan et al. 2020). Sentence
encoders such as all-MiniLM-L6-v2 ship without their MLM head, so the head is first trained
alone on the frozen encoder (``head_warmup_steps``); only then does the encoder move, so a
random head's gradients never reach it. The held-out MLM loss on target text is measured after
the warm-up (the unadapted encoder with a trained head) and at the end: the drop is the
adaptation.

The result is an ordinary backbone artifact (``model/`` + ``backbone.json`` with a new
fingerprint), so feature extraction and every fine-tuning strategy run on it unchanged.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit import storage
from transferkit.backbones import BackboneInfo
from transferkit.backbones.text import autocast, pad, tokenize
from transferkit.config import DomainAdaptationConfig, StorageConfig
from transferkit.data.readers import read_unlabelled_texts
from transferkit.errors import DataError, StorageError, TrainingError
from transferkit.progress import progress
from transferkit.training.finetune import apply_gradients, linear_schedule

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx")


def read_unlabelled(strategy: DomainAdaptationConfig, storage_config: StorageConfig) -> list[str]:
    """The unlabelled texts of ``strategy.unlabelled_uri`` (txt: one per line; tables: a column).

    Raises:
        DataError: the file is unreadable, empty, or lacks the text column.
    """
    uri = strategy.unlabelled_uri
    assert uri is not None  # required for text by PipelineConfig validation
    with tempfile.TemporaryDirectory(prefix="transferkit-unlabelled-") as scratch:
        try:
            path = storage.fetch_file(uri, Path(scratch), storage_config)
        except StorageError as exc:
            raise StorageError(f"strategy.unlabelled_uri: {exc}") from None
        texts = read_unlabelled_texts(path, uri, strategy.text_column)
    if strategy.max_rows is not None and len(texts) > strategy.max_rows:
        rng = np.random.default_rng(0)
        texts = [texts[i] for i in np.sort(rng.choice(len(texts), strategy.max_rows, False))]
    if len(texts) < 20:
        raise DataError(
            f"{uri}: {len(texts)} unlabelled texts; domain adaptation needs at least 20 (more "
            "is better: thousands)"
        )
    return texts


def mask_tokens(
    batch: torch.Tensor,
    attention: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``probability`` of the real tokens; 80 % [MASK], 10 % random, 10 % kept.

    Returns:
        The corrupted input ids and the labels (-100 where no prediction is asked).
    """
    labels = batch.clone()
    candidates = attention.bool() & ~special
    chosen = (torch.rand(batch.shape, generator=generator) < probability) & candidates
    # At least one prediction per text keeps short texts from contributing nothing.
    empty = ~chosen.any(dim=1) & candidates.any(dim=1)
    for row in torch.nonzero(empty).flatten().tolist():
        options = torch.nonzero(candidates[row]).flatten()
        pick = options[torch.randint(len(options), (1,), generator=generator)]
        chosen[row, pick] = True
    labels[~chosen] = -100
    corrupted = batch.clone()
    roll = torch.rand(batch.shape, generator=generator)
    corrupted[chosen & (roll < 0.8)] = mask_id
    random_slots = chosen & (roll >= 0.8) & (roll < 0.9)
    corrupted[random_slots] = torch.randint(
        vocab_size, (int(random_slots.sum()),), generator=generator
    )
    return corrupted, labels


class _Batches:
    """Random batches of tokenised texts with their special-token masks, seeded."""

    def __init__(self, ids: list[list[int]], special_ids: set[int], pad_id: int, seed: int):
        self.ids, self.special_ids, self.pad_id = ids, special_ids, pad_id
        self.rng = np.random.default_rng(seed)

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, attention = pad([self.ids[i] for i in rows], self.pad_id)
        special = torch.zeros_like(batch, dtype=torch.bool)
        for token in self.special_ids:
            special |= batch == token
        return batch, attention, special

    def sample(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.take(self.rng.choice(len(self.ids), size=min(size, len(self.ids))))


def masked_logits(
    model: nn.Module,
    inputs: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabulary logits at the masked positions only, and their target token ids.

    The MLM head's vocabulary projection (30k outputs per token) costs more than the encoder
    on short texts; only the ~15 % masked positions need it. BERT-style (``cls``) and
    RoBERTa-style (``lm_head``) heads take that path; other models run the full forward.
    """
    labels = labels.to(device)
    asked = labels != -100
    head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
    if head is not None:
        body = getattr(model, str(model.base_model_prefix))
        hidden = body(input_ids=inputs.to(device), attention_mask=attention.to(device))
        return head(hidden.last_hidden_state[asked]), labels[asked]
    logits = model(input_ids=inputs.to(device), attention_mask=attention.to(device)).logits
    return logits[asked], labels[asked]


def _mlm_loss(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str,
) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for inputs, labels, attention in batches:
            with autocast(precision, device):
                logits, targets = masked_logits(model, inputs, attention, labels, device)
            loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    return total / max(count, 1)


def adapt_backbone(
    strategy: DomainAdaptationConfig,
    storage_config: StorageConfig,
    backbone_dir: Path,
    info: BackboneInfo,
    output_dir: Path,
    precision: str,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Continue MLM pre-training of the backbone and write the adapted backbone artifact.

    Args:
        strategy: the domain_adaptation options (corpus, steps, rates).
        storage_config: how to read the corpus URI.
        backbone_dir: the fetch_backbone artifact to adapt.
        info: its ``backbone.json``.
        output_dir: folder to create atomically: ``model/`` and ``backbone.json``.
        precision: 'bf16' or 'fp32' autocast.
        seed: seeds masking, batch order and the head's initialisation.
        device: where to train.

    Returns:
        Corpus size, steps, and the held-out MLM loss before and after adaptation.

    Raises:
        TrainingError: the backbone has no masked-language-model form, or the loss diverged.
    """
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    hf_logging.set_verbosity_error()  # the missing MLM head is expected: it is trained here
    model_dir = backbone_dir / "model"
    texts = read_unlabelled(strategy, storage_config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.mask_token_id is None:
        raise TrainingError(
            f"{info.source}: its tokenizer has no mask token, so it cannot continue "
            "masked-language-model pre-training; use another strategy"
        )
    torch.manual_seed(seed)
    try:
        model = AutoModelForMaskedLM.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
        ).to(device)
    except ValueError as exc:
        raise TrainingError(
            f"{info.source} ({info.architecture}) has no masked-language-model form "
            f"({str(exc).splitlines()[0][:120]}); use another strategy"
        ) from None
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    held_count = min(max(len(texts) // 20, 16), 512)
    held, train_rows = order[:held_count], order[held_count:]
    ids = tokenize(tokenizer, texts, strategy.max_length or info.max_length)
    special_ids = set(tokenizer.all_special_ids)
    feeder = _Batches([ids[i] for i in train_rows], special_ids, tokenizer.pad_token_id or 0, seed)
    held_feeder = _Batches([ids[i] for i in held], special_ids, tokenizer.pad_token_id or 0, seed)
    generator = torch.Generator().manual_seed(seed)

    def corrupt(
        batch: torch.Tensor, attention: torch.Tensor, special: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(
            batch,
            attention,
            special,
            tokenizer.mask_token_id,
            len(tokenizer),
            strategy.mlm_probability,
            generator,
        )

    held_batches = []
    for start in range(0, len(held), strategy.batch_size):
        batch, attention, special = held_feeder.take(
            np.arange(start, min(start + strategy.batch_size, len(held)))
        )
        inputs, labels = corrupt(batch, attention, special)
        held_batches.append((inputs, labels, attention))

    base_prefix = model.base_model_prefix
    encoder_parameters = [p for n, p in model.named_parameters() if n.startswith(base_prefix)]
    head_parameters = [p for n, p in model.named_parameters() if not n.startswith(base_prefix)]
    # The decoder is tied to the word embeddings: it belongs to the encoder's group.
    tied = {id(p) for p in encoder_parameters}
    head_parameters = [p for p in head_parameters if id(p) not in tied]
    losses: list[float] = []
    before = after = float("nan")

    def run(steps: int, parameters: list[nn.Parameter], learning_rate: float, label: str) -> None:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01, fused=True)
        schedule = linear_schedule(optimizer, steps, 0.06)
        model.train()
        for step in progress(range(steps), steps, label):
            batch, attention, special = feeder.sample(strategy.batch_size)
            inputs, labels = corrupt(batch, attention, special)
            with autocast(precision, device):
                logits, targets = masked_logits(model, inputs, attention, labels, device)
            loss = nn.functional.cross_entropy(logits.float(), targets)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"masked-language-model loss became {loss.item()} at step {step}; lower "
                    "strategy.learning_rate"
                )
            apply_gradients(loss, optimizer, schedule, parameters, 1.0)
            losses.append(loss.item())
            if (step + 1) % max(steps // 10, 1) == 0:
                log.info(
                    "%s step %d/%d: MLM loss %.3f", label, step + 1, steps, np.mean(losses[-20:])
                )

    if strategy.head_warmup_steps:
        run(strategy.head_warmup_steps, head_parameters, strategy.head_learning_rate, "MLM head")
    before = _mlm_loss(model, held_batches, device, precision)
    log.info("held-out MLM loss with the original encoder: %.4f", before)
    run(strategy.steps, [p for p in model.parameters()], strategy.learning_rate, "MLM adapt")
    after = _mlm_loss(model, held_batches, device, precision)
    log.info("held-out MLM loss after adaptation: %.4f (was %.4f)", after, before)

    with storage.atomic_dir(output_dir) as tmp:
        body = AutoModel.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
        adapted = getattr(model, base_prefix).state_dict()
        missing, unexpected = body.load_state_dict(adapted, strict=False)
        if unexpected or any(not name.startswith("pooler.") for name in missing):
            raise TrainingError(
                f"adapted weights do not fit {info.architecture} (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); report this backbone"
            )
        (tmp / "model").mkdir()
        body.save_pretrained(tmp / "model", safe_serialization=True)
        # Tokenizer and sentence-transformers files (pooling, normalisation) come along.
        for path in model_dir.rglob("*"):
            relative = path.relative_to(model_dir)
            target = tmp / "model" / relative
            if path.is_file() and not target.exists() and not path.name.endswith(WEIGHT_SUFFIXES):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        weights = {
            p.name: storage.sha256_file(p) for p in sorted((tmp / "model").glob("*.safetensors"))
        }
        adapted_info = info.model_copy(
            update={
                "source": f"{info.source} + MLM on {strategy.unlabelled_uri}",
                "weights": weights,
                "fingerprint": storage.sha256_tree(tmp / "model"),
            }
        )
        storage.write_json(tmp / "backbone.json", adapted_info.model_dump())
    record = {
        "unlabelled_texts": len(texts),
        "held_out_texts": int(held_count),
        "head_warmup_steps": strategy.head_warmup_steps,
        "steps": strategy.steps,
        "held_out_mlm_loss_before": round(before, 4),
        "held_out_mlm_loss_after": round(after, 4),
        "held_out_perplexity_before": round(math.exp(min(before, 50)), 2),
        "held_out_perplexity_after": round(math.exp(min(after, 50)), 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return record
