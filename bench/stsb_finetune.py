"""Fine-tuning on sentence pairs scored 0-5 (STS Benchmark, official splits): transferkit's
full_finetune of text pairs against sentence-transformers, on the same pairs and the same MiniLM.

Both sides fine-tune all of all-MiniLM-L6-v2 on sts-train (5,749 pairs) with the same recipe
(module constants: 4 epochs, batch 16, peak learning rate 2e-5 with 10 % linear warm-up then
linear decay, AdamW with weight decay 0.01, gradient clipping at 1, texts cut at 128 tokens,
seed 42), validate on sts-dev (1,500) at the end of every epoch and keep the best checkpoint by
its Spearman, and are scored by the Spearman of their predictions on sts-test (1,379). Two
variants, each against its peer:

- cross: both texts of a pair read together through the encoder (a cross-encoder).
  transferkit: the library steps a run executes, in process (ingest_data reading the headerless
  STS files, fetch_backbone, extract_features, then ``train`` with ``strategy: full_finetune,
  pair_encoder: cross`` and ``task: regression``, then ``evaluate``): MSE on the scores, the
  head starting at the mean training score. Peer: ``CrossEncoder(num_labels=1)`` trained on
  the scores / 5 with its default loss for one label (binary cross-entropy on the logit), as
  its STS-B example does; test scores from ``CrossEncoder.predict``.
- bi: each text encoded on its own. transferkit: the same steps with ``pair_encoder: bi``
  (``head_init: probe``: a ridge head on the frozen pair features [u, v, |u - v|, u * v], then
  everything trains with MSE). Peer: ``SentenceTransformer`` with ``CosineSimilarityLoss`` on
  the scores / 5; a test pair's score is the cosine of its two unit embeddings.

How the peers train: ``CrossEncoder.old_fit`` and ``SentenceTransformer.old_fit``, the libraries'
own training loops with the pre-Trainer arguments (a DataLoader of ``InputExample``s,
``epochs``, ``warmup_steps``, ``optimizer_params``, an evaluator, ``output_path`` and
``save_best_model``). In 6.2.0 ``fit`` still exists but hands the same arguments to
``CrossEncoderTrainer`` / ``SentenceTransformerTrainer``, which need the ``datasets`` package;
it is neither installed nor in the bench extra, and ``old_fit`` needs nothing more. The dev
evaluators are ``CrossEncoderCorrelationEvaluator`` and ``EmbeddingSimilarityEvaluator``
(cosine); ``SentenceTransformer.old_fit`` compares the evaluator's result with a number, so its
evaluator is wrapped to return its primary metric (Spearman of the cosines). The peer's best
checkpoint is reloaded from ``output_path`` before the test.

What is timed: the training alone, wall seconds, validations included on both sides: our
``train`` (the probe of ``head_init: probe`` and writing the model folder included), the
peer's ``old_fit`` and the reload of its best checkpoint. Not timed: reading the data, loading
the backbone, our ingest and feature extraction, the test predictions. Our ``details``
(``train_seconds``: the training loop without validation, ``examples_per_second``,
``best_step``, ``best_validation_metric``) are recorded too.

Differences that stay, each side at its defaults: our precision is ``training.precision: auto``
(bf16 autocast where the CPU or GPU supports it) and the peer trains in fp32 (``use_amp``
off), as bench/finetune.py compares; our head learns at 10 × the learning rate
(``head_lr_multiplier``); we validate with batches of 128 and the peer's evaluators too. Our
early stopping is off (``early_stopping_patience: 0``) so that both sides run every epoch, as
the peer does. Both sides share the process and its torch thread count; they run once each,
ours first (each run lasts minutes, so neither gains from the other's warm caches), not in
alternating repetitions as the shorter benches do.

Printed per variant: each side's training seconds and their ratio (the peer's ÷ ours), and each
side's test Spearman × 100 and the difference.

    python bench/stsb_finetune.py [--out bench/results/stsb-finetune-cpu.json]
    python bench/stsb_finetune.py --variant cross        # one variant (default: both)
    python bench/stsb_finetune.py --smoke    # 200 / 100 / 100 pairs, 1 epoch (tests/bench)
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import stsb
from finetune import release

from transferkit.config import PipelineConfig

EPOCHS = 4
SMOKE_EPOCHS = 1
BATCH_SIZE = 16
LEARNING_RATE = 2e-5
WARMUP_RATIO = 0.1
MAX_LENGTH = 128
SEED = 42
SMOKE_PAIRS = {"train": 200, "validation": 100, "test": 100}  # the first pairs of each file
VARIANTS = {"cross": "cross-encoder", "bi": "bi-encoder"}
PEER = "sentence-transformers"

log = logging.getLogger("bench.stsb_finetune")

Pairs = tuple[list[str], list[str], np.ndarray]  # first texts, second texts, scores 0-5


@dataclass
class Prepared:
    """Our artifacts both variants train from (made once, untimed) and the peer's pairs."""

    files: dict[str, Path]
    dataset: Path
    backbone: Path
    features: Path
    pairs: dict[str, Pairs]
    ingested: dict[str, int]


def write_files(folder: Path, smoke: bool) -> dict[str, Path]:
    """The STS-B files in ``folder`` (``smoke``: their first SMOKE_PAIRS lines); split → path."""
    files = stsb.pairs(folder, None)
    if smoke:
        for split, path in files.items():
            lines = path.read_text(encoding="utf-8").splitlines()[: SMOKE_PAIRS[split]]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def config_for(files: dict[str, Path], work: Path, variant: str, epochs: int) -> PipelineConfig:
    """Our run: the given splits, full_finetune of ``variant`` pairs with the shared recipe."""
    return PipelineConfig.model_validate(
        {
            "task": "regression",
            "data": {
                **{f"{split}_uri": str(path) for split, path in files.items()},
                "format": "tsv",
                "columns": stsb.COLUMNS,
                "text_column": "sentence1",
                "text_pair_column": "sentence2",
                "label_column": "score",
            },
            "backbone": {"uri": common.backbone_uri(), "max_length": MAX_LENGTH},
            "strategy": {"name": "full_finetune", "pair_encoder": variant},
            "training": {
                "epochs": epochs,
                "batch_size": BATCH_SIZE,
                "learning_rate": LEARNING_RATE,
                "warmup_ratio": WARMUP_RATIO,
                "seed": SEED,
                "early_stopping_patience": 0,  # every epoch, as the peer
            },
            "evaluation": {"primary_metric": "spearman", "batch_size": stsb.BATCH},
            "runtime": {"work_dir": str(work), "feature_cache": str(work / "cache")},
        }
    ).resolved()


def prepare(files: dict[str, Path], root: Path) -> Prepared:
    """Ingest the files, fetch the backbone, extract the pair features; read the peer's pairs."""
    from transferkit.backbones import fetch_backbone
    from transferkit.data import ingest_data
    from transferkit.features import extract_features

    config = config_for(files, root / "work-prepare", "cross", SMOKE_EPOCHS)
    ingested = ingest_data(config, root / "dataset")
    fetch_backbone(config, root / "backbone")
    extract_features(config, root / "dataset", root / "backbone", root / "features")
    return Prepared(
        files=files,
        dataset=root / "dataset",
        backbone=root / "backbone",
        features=root / "features",
        pairs={split: stsb._read(path) for split, path in files.items()},
        ingested=dict(ingested.rows),
    )


def ours(prepared: Prepared, variant: str, epochs: int, work: Path) -> dict[str, Any]:
    """``train`` (timed) then ``evaluate`` on sts-test."""
    from transferkit.evaluation import evaluate
    from transferkit.training import train

    config = config_for(prepared.files, work / "work", variant, epochs)
    model = work / "model"
    seconds, trained = common.timed(
        lambda: train(config, prepared.dataset, prepared.backbone, prepared.features, model)
    )
    scored = evaluate(config, prepared.dataset, model, work / "evaluation")
    details = trained.details
    return {
        "train_seconds": seconds,
        "test_spearman": scored.scores.metric("spearman"),
        "best_validation_spearman": float(details["best_validation_metric"]),
        "best_step": details["best_step"],
        "steps": details["steps"],
        "loop_seconds": details["train_seconds"],
        "examples_per_second": details["examples_per_second"],
        "precision": trained.precision,
    }


def loader(pairs: Pairs) -> Any:
    """The training pairs as the peers' ``old_fit`` reads them: a shuffled DataLoader of
    ``InputExample``s, scores scaled to [0, 1]."""
    from sentence_transformers import InputExample
    from torch.utils.data import DataLoader

    first, second, scores = pairs
    examples = [
        InputExample(texts=[a, b], label=float(s) / 5)
        for a, b, s in zip(first, second, scores, strict=True)
    ]
    return DataLoader(examples, shuffle=True, batch_size=BATCH_SIZE)  # type: ignore[arg-type]


def fit_arguments(batches: int, epochs: int, best: Path) -> dict[str, Any]:
    """What both peers' ``old_fit`` is given besides the data and the evaluator."""
    return {
        "epochs": epochs,
        "warmup_steps": int(WARMUP_RATIO * batches * epochs),  # rounded down, as ours
        "optimizer_params": {"lr": LEARNING_RATE},
        "output_path": str(best),
        "save_best_model": True,
        "show_progress_bar": False,
    }


def spearman(truth: np.ndarray, predicted: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(truth, predicted).statistic)


def peer_cross(prepared: Prepared, epochs: int, work: Path) -> dict[str, Any]:
    """``CrossEncoder.old_fit`` with a dev correlation evaluator, the best checkpoint
    reloaded (timed); ``predict`` on sts-test."""
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderCorrelationEvaluator
    from transformers import set_seed

    set_seed(SEED)  # before loading, so the new head's initialisation repeats
    folder, target = str(common.minilm_folder()), common.device()
    model = CrossEncoder(folder, num_labels=1, max_length=MAX_LENGTH, device=target)
    data = loader(prepared.pairs["train"])
    first, second, scores = prepared.pairs["validation"]
    evaluator = CrossEncoderCorrelationEvaluator(
        [[a, b] for a, b in zip(first, second, strict=True)],
        scores.tolist(),
        batch_size=stsb.BATCH,
        write_csv=False,
    )
    best = work / "best"

    def fit() -> Any:
        model.old_fit(data, evaluator=evaluator, **fit_arguments(len(data), epochs, best))
        return CrossEncoder(str(best), max_length=MAX_LENGTH, device=target)

    seconds, trained = common.timed(fit)
    first, second, scores = prepared.pairs["test"]
    predicted = trained.predict(
        list(zip(first, second, strict=True)), batch_size=stsb.BATCH, show_progress_bar=False
    )
    return {
        "train_seconds": seconds,
        "test_spearman": spearman(scores, np.asarray(predicted)),
        "best_validation_spearman": float(model.best_score),
        "steps": len(data) * epochs,
        "precision": "fp32",
    }


def peer_bi(prepared: Prepared, epochs: int, work: Path) -> dict[str, Any]:
    """``SentenceTransformer.old_fit`` with ``CosineSimilarityLoss`` and a dev cosine
    evaluator, the best checkpoint reloaded (timed); the cosines of sts-test's pairs."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.evaluation.evaluator import BaseEvaluator
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
    )
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
    from transformers import set_seed

    class Primary(BaseEvaluator):
        """An evaluator's primary metric alone: old_fit compares the result with a number."""

        def __init__(self, inner: EmbeddingSimilarityEvaluator) -> None:
            super().__init__()
            self.inner = inner

        def __call__(
            self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1
        ) -> float:
            metrics = self.inner(model, output_path, epoch, steps)
            return float(metrics[str(self.inner.primary_metric)])  # named by the call

    set_seed(SEED)
    folder, target = str(common.minilm_folder()), common.device()
    model = SentenceTransformer(folder, device=target)
    model.max_seq_length = MAX_LENGTH
    data = loader(prepared.pairs["train"])
    first, second, scores = prepared.pairs["validation"]
    evaluator = Primary(
        EmbeddingSimilarityEvaluator(
            first,
            second,
            scores.tolist(),
            batch_size=stsb.BATCH,
            main_similarity="cosine",
            write_csv=False,
        )
    )
    best = work / "best"

    def fit() -> Any:
        objectives = [(data, CosineSimilarityLoss(model))]
        model.old_fit(objectives, evaluator=evaluator, **fit_arguments(len(data), epochs, best))
        reloaded = SentenceTransformer(str(best), device=target)
        reloaded.max_seq_length = MAX_LENGTH
        return reloaded

    seconds, trained = common.timed(fit)
    first, second, scores = prepared.pairs["test"]
    u, v = (
        trained.encode(texts, batch_size=stsb.BATCH, normalize_embeddings=True)
        for texts in (first, second)
    )
    return {
        "train_seconds": seconds,
        "test_spearman": spearman(scores, (np.asarray(u) * np.asarray(v)).sum(axis=1)),
        "best_validation_spearman": float(model.best_score),
        "steps": len(data) * epochs,
        "precision": "fp32",
    }


PEERS = {"cross": peer_cross, "bi": peer_bi}


def variant_run(
    prepared: Prepared, variant: str, epochs: int, root: Path, threads: int
) -> dict[str, dict[str, Any]]:
    """Ours, then the peer, of one variant; each side in its own folder, the thread pool kept."""
    sides: dict[str, Callable[[Path], dict[str, Any]]] = {
        "transferkit": lambda work: ours(prepared, variant, epochs, work),
        PEER: lambda work: PEERS[variant](prepared, epochs, work),
    }
    results = {}
    for name, run in sides.items():
        work = root / variant / name
        work.mkdir(parents=True)
        results[name] = run(work)
        release()
        if torch.get_num_threads() != threads:
            # A library changed the thread pool: put it back so the other side gets the same.
            log.warning("%s changed torch threads to %d", name, torch.get_num_threads())
            torch.set_num_threads(threads)
    return results


def quiet() -> None:
    """The libraries' load reports and progress bars off; this script prints its figures."""
    import transformers

    transformers.logging.set_verbosity_error()  # the new heads' "newly initialized" notices
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    logging.getLogger("transferkit.progress").setLevel(logging.WARNING)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument(
        "--smoke", action="store_true", help="the first 200 / 100 / 100 pairs, one epoch"
    )
    parser.add_argument(
        "--variant", choices=[*VARIANTS, "both"], default="both", help="which pair encoder"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s | %(message)s")
    quiet()
    import sentence_transformers

    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    epochs = SMOKE_EPOCHS if args.smoke else EPOCHS
    threads = torch.get_num_threads()
    report: dict[str, Any] = {
        "benchmark": "stsb_finetune",
        "peer": f"{PEER} {sentence_transformers.__version__}",
        "machine": common.machine(common.device(), args.smoke),
        "recipe": {
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "warmup_ratio": WARMUP_RATIO,
            "max_length": MAX_LENGTH,
            "seed": SEED,
        },
    }
    print(f"machine: {report['machine']}")
    print(f"device {common.device()}, torch threads {threads} (both sides)")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-stsb-finetune-") as scratch:
        root = Path(scratch)
        (root / "files").mkdir()
        prepared = prepare(write_files(root / "files", args.smoke), root)
        source = {split: len(pairs[2]) for split, pairs in prepared.pairs.items()}
        report["pairs"] = {"source": source, "ingested": prepared.ingested}
        print(f"pairs: {source} (sts-train / sts-dev / sts-test), {epochs} epoch(s)")
        if prepared.ingested != source:
            print(f"WARNING: our ingest kept {prepared.ingested}; the peer trains on every pair")
        for variant in variants:
            results[variant] = variant_run(prepared, variant, epochs, root, threads)
    report["results"] = {}
    for variant, sides in results.items():
        mine, theirs = sides["transferkit"], sides[PEER]
        ratio = theirs["train_seconds"] / mine["train_seconds"]
        difference = 100 * (mine["test_spearman"] - theirs["test_spearman"])
        what = VARIANTS[variant]
        print(
            f"{what}, train: transferkit {mine['train_seconds']:.2f} s | {PEER} "
            f"{theirs['train_seconds']:.2f} s | ratio {ratio:.2f}x faster"
        )
        print(
            f"{what}, test Spearman x 100: transferkit {100 * mine['test_spearman']:.2f} | "
            f"{PEER} {100 * theirs['test_spearman']:.2f} | difference {difference:+.2f}"
        )
        report["results"][variant] = {
            **{
                name: {
                    k: common.significant(v) if isinstance(v, float) and math.isfinite(v) else v
                    for k, v in side.items()
                }
                for name, side in sides.items()
            },
            "ratio_train_seconds": round(ratio, 2),
            "spearman_difference_points": round(difference, 2),
        }
    common.save(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
