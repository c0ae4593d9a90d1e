"""Fine-tuning throughput: transferkit's full_finetune against the Hugging Face Trainer.

Both sides fine-tune all-MiniLM-L6-v2 for one epoch on the same SST-2 rows (the first
``--rows`` of train.tsv; the next ``--validation-rows`` are our validation split, used only for
our checkpoint selection) and are scored on the whole GLUE dev set (872 rows).

- transferkit: the core steps in-process, as the pipeline's components call them
  (ingest_data → fetch_backbone → extract_features once, then train → evaluate per repetition
  in a fresh work dir), with the config's default recipe (``strategy.name=full_finetune``,
  ``training.epochs=1``, ``training.precision=auto``). Figure: the fine-tuning loop's
  examples/s (``details["examples_per_second"]``, validation time excluded).
- Peers: ``AutoModelForSequenceClassification`` + ``Trainer`` set up as the GLUE example
  (run_glue.py) does, with dynamic padding (``DataCollatorWithPadding``) and our batch size,
  learning rate, warm-up, linear decay, weight decay, clipping and seed, twice: at its best
  documented settings on this hardware (``bf16=True`` and length-grouped batches,
  ``group_by_length=True``, in transformers 5 ``train_sampling_strategy="group_by_length"``:
  the two things our speed comes from) and at its defaults (fp32, random batches). Figure:
  ``train_samples_per_second`` from ``trainer.train()``.

Every repetition runs the three sides on one seed (the config's seed + the repetition's index)
in a rotating order (each side leads in turn); all share the process and its torch thread
count. Printed: each repetition's figures, then per side min / median / max examples/s (a
spread above 15 % flagged), the medians' ratios — the headline against the best peer — and
whether issue 20's targets (≥ 1.5× the best peer's examples/s; mean dev accuracy over the
seeds ≥ the best peer's − 0.5 points) are met. Nothing is asserted.

    python bench/finetune.py                                  # 8,000 rows, 5 repetitions
    python bench/finetune.py --smoke      # 64 + 32 rows, 100 dev rows, once (tests/bench)
    python bench/finetune.py --set training.batch_size=64 --out /tmp/finetune.json
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

from transferkit.backbones import fetch_backbone
from transferkit.config import PipelineConfig, apply_overrides, validate_mapping
from transferkit.data import ingest_data, load_label_map, load_split
from transferkit.evaluation import evaluate
from transferkit.features import extract_features
from transferkit.training import train
from transferkit.training.finetune import total_steps

BEST, FP32 = "Trainer bf16+grouped", "Trainer fp32"  # the peer at its best and at its defaults
SPEED_TARGET = 1.5  # ours ÷ the best peer's examples/s
ACCURACY_MARGIN = 0.5  # points of dev accuracy ours may trail the peer's by

log = logging.getLogger("bench.finetune")


@dataclass
class Run:
    """One side's result in one repetition."""

    side: str
    examples_per_second: float
    train_wall_seconds: float
    dev_accuracy: float
    rows: int
    steps: int
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self, repetition: str) -> str:
        return (
            f"{repetition} {self.side:>20}: {self.examples_per_second:8.1f} examples/s "
            f"(train {self.train_wall_seconds:6.1f} s wall, {self.rows} rows, {self.steps} "
            f"steps, {self.precision}), dev accuracy {100 * self.dev_accuracy:.2f} %"
        )


@dataclass
class Prepared:
    """The artifacts both sides' runs start from, made once."""

    data: Path
    dataset: Path
    backbone: Path
    features: Path
    rows: dict[str, dict[str, int]]
    texts_changed_by_ingest: int
    extract_texts_per_second: float


def write_splits(folder: Path, rows: int, validation_rows: int) -> None:
    """train.tsv, validation.tsv and test.tsv (GLUE dev) of SST-2, cut in file order.

    Lines are copied verbatim: with quoting off (as GLUE's TSVs need) one line is one row, so
    slicing lines gives exactly the rows ``common.sst2_sentences`` reads.
    """
    lines = (common.SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, body = lines[0], lines[1:]
    if rows + validation_rows > len(body):
        raise SystemExit(
            f"--rows {rows} + --validation-rows {validation_rows} exceed the {len(body):,} "
            "rows of train.tsv"
        )
    cuts = {"train": body[:rows], "validation": body[rows : rows + validation_rows]}
    for name, part in cuts.items():
        (folder / f"{name}.tsv").write_text("\n".join([header, *part]) + "\n", encoding="utf-8")
    shutil.copyfile(common.SST2 / "dev.tsv", folder / "test.tsv")


def config_for(data: Path, work: Path, overrides: list[str]) -> PipelineConfig:
    """Our run: given splits (no carving, no row cap), the default recipe, one epoch."""
    raw: dict[str, Any] = {
        "data": {
            "train_uri": str(data / "train.tsv"),
            "validation_uri": str(data / "validation.tsv"),
            "test_uri": str(data / "test.tsv"),
            "text_column": "sentence",
            "label_column": "label",
            "label_names": {"0": "negative", "1": "positive"},
        },
        "backbone": {"uri": common.backbone_uri()},
        "strategy": {"name": "full_finetune"},
        "training": {"epochs": 1, "precision": "auto"},
        "runtime": {"work_dir": str(work)},
    }
    return validate_mapping(apply_overrides(raw, list(overrides)), "--set").resolved()


def prepare(root: Path, rows: int, validation_rows: int, overrides: list[str]) -> Prepared:
    """Write the splits, ingest them, fetch the backbone and extract features (untimed)."""
    data = root / "data"
    data.mkdir()
    write_splits(data, rows, validation_rows)
    config = config_for(data, root / "work-prepare", overrides)
    ingested = ingest_data(config, root / "dataset")
    fetch_backbone(config, root / "backbone")
    features = extract_features(config, root / "dataset", root / "backbone", root / "features")
    # Ingest strips whitespace and may refuse rows: count what it kept and what it changed.
    source_texts, _ = common.sst2_sentences(rows + validation_rows)
    kept_train, _ = load_split(root / "dataset", "train")
    kept_validation, _ = load_split(root / "dataset", "validation")
    source = {"train": source_texts[:rows], "validation": source_texts[rows:]}
    changed = sum(
        a != b
        for name, kept in (("train", kept_train), ("validation", kept_validation))
        for a, b in zip(source[name], kept, strict=False)
    )
    return Prepared(
        data=data,
        dataset=root / "dataset",
        backbone=root / "backbone",
        features=root / "features",
        rows={
            "source": {
                "train": rows,
                "validation": validation_rows,
                "test": len(common.sst2_sentences(split="dev")[0]),
            },
            "ingested": dict(ingested.rows),
        },
        texts_changed_by_ingest=int(changed),
        extract_texts_per_second=float(features.texts_per_second or 0.0),
    )


def run_ours(config: PipelineConfig, prepared: Prepared, folder: Path) -> Run:
    """train() with full_finetune, then evaluate() on the test split (GLUE dev)."""
    model_dir = folder / "model"
    seconds, trained = common.timed(
        lambda: train(config, prepared.dataset, prepared.backbone, prepared.features, model_dir)
    )
    scored = evaluate(config, prepared.dataset, model_dir, folder / "evaluation")
    details = trained.details
    return Run(
        side="transferkit",
        examples_per_second=float(details["examples_per_second"]),
        train_wall_seconds=round(seconds, 2),
        dev_accuracy=float(scored.scores.metric("accuracy")),
        rows=trained.labelled_examples,
        steps=int(details["steps"]),
        precision=trained.precision,
        extra={
            "loop_seconds": details["train_seconds"],
            "best_step": details["best_step"],
            "validations": details["validations"],
            "evaluation_precision": scored.precision,
        },
    )


def encode(tokenizer: Any, texts: list[str], labels: np.ndarray, max_length: int) -> list[dict]:
    """Token ids per text, truncated and unpadded, as run_glue.py's preprocessing gives them."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        {**{key: values[i] for key, values in encoded.items()}, "label": int(labels[i])}
        for i in range(len(texts))
    ]


def run_best_peer(config: PipelineConfig, prepared: Prepared, folder: Path) -> Run:
    """The Trainer at its best here: bf16 autocast and length-grouped batches."""
    return run_peer(config, prepared, folder, best=True)


def run_peer(config: PipelineConfig, prepared: Prepared, folder: Path, best: bool = False) -> Run:
    """The Trainer on the rows our ingest kept, with our recipe and dynamic padding; fp32
    and random batches, or (``best``) bf16 autocast and length-grouped batches."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    training = config.training
    model_folder = common.minilm_folder()
    # The artifact's rows, not the TSV's: the peer sees exactly what our ingest kept.
    train_texts, train_labels = load_split(prepared.dataset, "train")
    test_texts, test_labels = load_split(prepared.dataset, "test")
    tokenizer = AutoTokenizer.from_pretrained(model_folder, local_files_only=True)
    train_set = encode(tokenizer, train_texts, train_labels, config.backbone.max_length)
    test_set = encode(tokenizer, test_texts, test_labels, config.backbone.max_length)
    # run_glue.py seeds before loading, so the new classifier's initialisation repeats.
    set_seed(training.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_folder,
        num_labels=len(load_label_map(prepared.dataset)),
        local_files_only=True,
        dtype=torch.float32,  # fp32 whatever the checkpoint stores (a GPU copy is fp16)
    )
    steps = total_steps(config.training, len(train_set))
    arguments = TrainingArguments(
        output_dir=str(folder / "trainer"),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=config.evaluation.batch_size,
        learning_rate=training.learning_rate,
        num_train_epochs=training.epochs,
        # Only when our step bounds change the length: with max_steps the Trainer counts
        # steps × batch size as examples seen, a partial last batch included.
        max_steps=steps if training.max_steps or training.min_steps else -1,
        lr_scheduler_type="linear",
        # A step count, not a ratio: the Trainer rounds a ratio up, our schedule down.
        warmup_steps=int(steps * training.warmup_ratio),
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=best,
        # transformers 5's spelling of group_by_length=True
        train_sampling_strategy="group_by_length" if best else "random",
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=train_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    # With tqdm off the Trainer prints its final metrics itself; this script prints its own.
    trainer.remove_callback(PrinterCallback)
    seconds, result = common.timed(trainer.train)
    predicted = trainer.predict(test_set)  # type: ignore[arg-type]
    logits = np.asarray(predicted.predictions)
    # Scored against the labels the Trainer returns with its predictions, in its order: with
    # length-grouped batches transformers 5 predicts in length-grouped order too (its
    # _get_eval_sampler), so the test file's label order would score a shuffle (chance).
    scored_labels = np.asarray(predicted.label_ids)
    if sorted(scored_labels.tolist()) != sorted(np.asarray(test_labels).tolist()):
        raise RuntimeError("the Trainer's predictions do not cover the test rows once each")
    return Run(
        side=BEST if best else FP32,
        examples_per_second=float(result.metrics["train_samples_per_second"]),
        train_wall_seconds=round(seconds, 2),
        dev_accuracy=float(np.mean(logits.argmax(axis=-1) == scored_labels)),
        rows=len(train_set),
        steps=int(trainer.state.global_step),
        precision="bf16 autocast" if best else "fp32",
        extra={
            "train_runtime": result.metrics["train_runtime"],
            "train_loss": result.metrics.get("train_loss"),
            "warmup_steps": arguments.warmup_steps,
            "optimizer": str(arguments.optim),
        },
    )


def release() -> None:
    """Free the last run's model before the next one starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SIDES = {"transferkit": run_ours, BEST: run_best_peer, FP32: run_peer}


def repetition(
    index: int,
    args: argparse.Namespace,
    prepared: Prepared,
    root: Path,
    threads: int,
    warm_up: bool = False,
) -> dict[str, Run]:
    """One run of each side, in a fresh work dir, on seed ``seed + index``; the side that
    leads rotates.

    ``warm_up``: a few steps of each side, untimed, so that neither side's first timed run
    pays for first-use costs (kernel selection, page cache, allocator growth).
    """
    work = root / (f"repetition-{index}" if not warm_up else "warm-up")
    seed = config_for(prepared.data, work / "work", args.set).training.seed + index
    overrides = [*args.set, f"training.seed={seed}"]
    if warm_up:
        overrides.append("training.max_steps=3")
    config = config_for(prepared.data, work / "work", overrides)
    runs: dict[str, Run] = {}
    for name in common.rotated(list(SIDES), index):
        folder = work / name.replace(" ", "-").replace("+", "-")
        folder.mkdir(parents=True)
        runs[name] = SIDES[name](config, prepared, folder)
        release()
        if torch.get_num_threads() != threads:
            # A library changed the thread pool: put it back so the other side gets the same.
            log.warning("%s changed torch threads to %d", name, torch.get_num_threads())
            torch.set_num_threads(threads)
    shutil.rmtree(work, ignore_errors=True)
    label = f"repetition {index + 1}/{args.repeats} (seed {seed})"
    if warm_up:
        label = "warm-up (3 steps, not counted)"
    for name in SIDES:
        print(runs[name].line(label))
    return runs


def summary(runs: list[dict[str, Run]]) -> dict[str, Any]:
    """Per side min / median / max examples/s and mean dev accuracy over the seeds; the
    medians' ratios (the headline against the best peer) and the targets' verdicts."""
    speed = {name: [r[name].examples_per_second for r in runs] for name in SIDES}
    accuracy = {name: 100 * sum(r[name].dev_accuracy for r in runs) / len(runs) for name in SIDES}
    print("examples/s, per side:")
    for name, values in speed.items():
        print(common.spread_line(name, values, "examples/s"))
    medians = {name: common.median(values) for name, values in speed.items()}
    ours = medians["transferkit"]
    for peer in (BEST, FP32):
        print(common.ratio_line("fine-tuning", ours, medians[peer], "examples/s", peer))
    print(
        f"dev accuracy, mean over {len(runs)} seed{'s' if len(runs) > 1 else ''}: "
        + ", ".join(f"{name} {value:.2f} %" for name, value in accuracy.items())
    )
    ratio = ours / medians[BEST]
    difference = accuracy["transferkit"] - accuracy[BEST]
    speed_met = ratio >= SPEED_TARGET
    accuracy_met = difference >= -ACCURACY_MARGIN
    print(
        f"target speed ≥ {SPEED_TARGET:g}× the best peer's examples/s: "
        f"{'met' if speed_met else 'NOT met'} ({ratio:.2f}×)"
    )
    print(
        f"target dev accuracy ≥ best peer − {ACCURACY_MARGIN:g} points over the seeds: "
        f"{'met' if accuracy_met else 'NOT met'} ({difference:+.2f} points)"
    )
    return {
        "examples_per_second": {name: common.spread(values) for name, values in speed.items()},
        # The medians under plain keys, for the README's figure markers.
        "headline": {
            "ours": ours,
            "best_peer": medians[BEST],
            "fp32_peer": medians[FP32],
            "ours_accuracy_percent": accuracy["transferkit"],
            "best_peer_accuracy_percent": accuracy[BEST],
        },
        "ratio_to_best_peer": ratio,
        "ratio_to_fp32_peer": ours / medians[FP32],
        "dev_accuracy_percent_mean": accuracy,
        "difference_to_best_peer_points": difference,
        "unstable_sides": [n for n, v in speed.items() if common.spread(v)["unstable"]],
        "targets": {"speed_1_5x_best_peer": speed_met, "accuracy_within_0_5_points": accuracy_met},
    }


def recipe(config: PipelineConfig) -> dict[str, Any]:
    """The settings both sides share (ours as resolved; the peer's are derived from them)."""
    training = config.training
    return {
        "strategy": config.strategy.model_dump(),
        "epochs": training.epochs,
        "batch_size": training.batch_size,
        "learning_rate": training.learning_rate,
        "warmup_ratio": training.warmup_ratio,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "seed": training.seed,
        "max_length": config.backbone.max_length,
        "precision_setting": training.precision,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000, help="training rows (file order)")
    parser.add_argument(
        "--validation-rows",
        type=int,
        default=800,
        help="the rows after the training rows: our validation split (checkpoint selection)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="repetitions of each side, one seed each"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="dotted.key=value",
        help="override our config (repeatable); training.batch_size, learning_rate, epochs, "
        "warmup_ratio, weight_decay, max_grad_norm, seed, max_steps and backbone.max_length "
        "carry over to the peer",
    )
    parser.add_argument("--verbose", action="store_true", help="show transferkit's INFO logs")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a tiny run: 64 training and 32 validation rows, the first "
        f"{common.SMOKE_TEST_ROWS} dev rows, one repetition (its figures mean nothing)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.validation_rows, args.repeats = 64, 32, 1
    if args.rows < 1 or args.validation_rows < 1 or args.repeats < 1:
        parser.error("--rows, --validation-rows and --repeats must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s | %(message)s",
    )
    logging.getLogger("transferkit.progress").setLevel(logging.WARNING)
    if not args.verbose:
        import transformers

        # The "newly initialized classifier" notice, once per repetition, is expected here.
        transformers.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch threads {threads} (both sides)")
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as scratch:
        root = Path(scratch)
        if args.smoke:
            common.smoke_data(root / "smoke-sst2")
        prepared = prepare(root, args.rows, args.validation_rows, args.set)
        config = config_for(prepared.data, root / "work-prepare", args.set)
        rows = prepared.rows
        print(
            f"rows: source train {rows['source']['train']} / validation "
            f"{rows['source']['validation']} / test {rows['source']['test']}; ingest kept "
            f"{rows['ingested']['train']} / {rows['ingested']['validation']} / "
            f"{rows['ingested']['test']} ({prepared.texts_changed_by_ingest} texts changed, "
            "whitespace stripped); the peer trains on the kept rows"
        )
        repetition(0, args, prepared, root, threads, warm_up=True)
        runs = [repetition(index, args, prepared, root, threads) for index in range(args.repeats)]
    trained = {name: {r[name].rows for r in runs} for name in SIDES}
    if len({frozenset(rows) for rows in trained.values()}) != 1:
        print(f"WARNING: training rows differ between the sides: {trained}")
    medians = summary(runs)
    report = {
        "benchmark": "finetune",
        "peers": {"best": BEST, "fp32": FP32},
        "machine": common.machine(device, args.smoke),
        "recipe": recipe(config),
        "overrides": args.set,
        "rows": prepared.rows,
        "texts_changed_by_ingest": prepared.texts_changed_by_ingest,
        "extract_texts_per_second": prepared.extract_texts_per_second,
        "repetitions": [{name: asdict(run[name]) for name in SIDES} for run in runs],
        "medians": medians,
    }
    common.save(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
