"""Check and time transferkit's CUDA path on one GPU: extraction, fine-tuning, evaluation.

Runs the core steps (no KFP, no MLflow) exactly as the pipeline's components call them, on
the real SST-2 data and the real all-MiniLM-L6-v2 backbone, and prints:

- the device, torch version and the measured bf16 matrix-multiply rate (the ceiling);
- feature extraction throughput (texts/s) over every split, at each ``--extract-batch``, with
  its model FLOP utilisation (useful encoder FLOPs per second ÷ the measured bf16 rate), and
  the same texts through sentence-transformers' ``encode`` (batch 32, fp32) for reference;
- for each recipe: fine-tuning throughput (examples/s) and its model FLOP utilisation
  (3 × forward FLOPs per example: forward plus backward), the best validation accuracy
  and the GLUE dev accuracy of the kept checkpoint;
- with several GPUs, training runs data-parallel (one process per GPU, DDP over NCCL) and the
  first recipe is repeated on one GPU, so the report shows the speed-up and that the
  accuracy holds.

    python bench/gpu_check.py --data ../shared/data/sst2 --out /tmp/gpu-check
    python bench/gpu_check.py --smoke --out /tmp/gpu-check   # 200 + 100 rows, 1 epoch

Without CUDA it refuses to run (the CPU path is measured by the test suite and the examples),
except with ``--smoke`` or ``--allow-cpu``: then the same code runs on the CPU, says so in one
line, and skips what only GPUs have (the data-parallel comparison). tests/bench runs the smoke.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from transferkit.backbones import fetch_backbone
from transferkit.config import PACKAGED_MINILM, PipelineConfig, apply_overrides
from transferkit.data import ingest_data
from transferkit.evaluation import evaluate
from transferkit.features import extract_features
from transferkit.training import train


def token_lengths(backbone: Path, dataset: Path, max_length: int) -> dict[str, np.ndarray]:
    """Token count of every text of every split, as the encoder sees it (no padding)."""
    from transformers import AutoTokenizer

    from transferkit.backbones.text import tokenize
    from transferkit.data import SPLITS, load_split

    tokenizer = AutoTokenizer.from_pretrained(backbone / "model", local_files_only=True)
    lengths = {}
    for split in SPLITS:
        texts, _ = load_split(dataset, split)
        lengths[split] = np.array([len(ids) for ids in tokenize(tokenizer, texts, max_length)])
    return lengths


def peer_extract(backbone: Path, dataset: Path, device: str) -> float:
    """sentence-transformers' encode(batch_size=32, fp32) over the same texts: texts/s."""
    from sentence_transformers import SentenceTransformer

    from transferkit.data import SPLITS, load_split

    model = SentenceTransformer(str(backbone / "model"), device=device)
    texts = [t for split in SPLITS for t in load_split(dataset, split)[0]]
    model.encode(texts[:256], batch_size=32)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    model.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - started)


def config_for(args: argparse.Namespace, work: Path, overrides: list[str]) -> PipelineConfig:
    raw: dict = {
        "data": {
            "train_uri": str(args.data / "train.tsv"),
            "test_uri": str(args.data / "dev.tsv"),
            "text_column": "sentence",
            "label_names": {"0": "negative", "1": "positive"},
            "split": {"validation": 0.05},
            "max_rows": args.max_rows,
        },
        "backbone": {"uri": args.backbone},
        "training": {
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "eval_every_steps": args.eval_every,
            "early_stopping_patience": 0,
            "precision": "auto",
        },
        "evaluation": {"batch_size": 256},
        "runtime": {"work_dir": str(work)},
    }
    return PipelineConfig.model_validate(apply_overrides(raw, overrides)).resolved()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst2"))
    parser.add_argument("--backbone", default=PACKAGED_MINILM)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument(
        "--extract-batch",
        type=int,
        action="append",
        default=[],
        help="evaluation.batch_size of an extraction pass; repeat for several (default: 256)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        help="comma-separated key=value overrides of one fine-tuning run, e.g. "
        "'training.learning_rate=1e-4,training.batch_size=64'; repeat for several "
        "(default: one run with the defaults)",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on the CPU anyway (a smoke test of this script)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a tiny run, on the CPU if there is no GPU: the first {common.SMOKE_TRAIN_ROWS} "
        f"training and {common.SMOKE_TEST_ROWS} dev rows, one epoch (figures mean nothing)",
    )
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not (args.allow_cpu or args.smoke):
        print(
            "gpu_check: no CUDA device; nothing to check (--smoke or --allow-cpu to smoke-test)",
            file=sys.stderr,
        )
        return 2
    if not on_gpu:
        print("gpu_check: no CUDA device: running on the CPU; no GPU figure is measured")
    if args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        args.data = common.smoke_data(args.out / "smoke-sst2", source=args.data)
        args.epochs, args.batch_size, args.max_rows = 1, 16, None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s | %(message)s")
    logging.getLogger("transferkit.progress").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "torch": torch.__version__,
        "bf16_matmul_tflops": common.significant(
            common.matmul_tflops(torch.bfloat16, "cuda", 1024 if args.smoke else 8192)
            if on_gpu
            else common.matmul_tflops(torch.bfloat16, "cpu", 256 if args.smoke else 1024)
        ),
        "runs": [],
    }
    print(json.dumps({k: report[k] for k in ("device", "torch", "bf16_matmul_tflops")}))

    base = config_for(args, args.out / "work", [])
    ingest_data(base, args.out / "dataset")
    fetch_backbone(base, args.out / "backbone")
    peak = report["bf16_matmul_tflops"]
    lengths = token_lengths(args.out / "backbone", args.out / "dataset", base.backbone.max_length)
    every = np.concatenate(list(lengths.values()))
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(args.out / "backbone" / "model")
    flops = common.encoder_flops(model_config, every)
    report["extract"] = []
    for index, batch in enumerate(args.extract_batch or [256]):
        config = config_for(
            args,
            args.out / f"work-extract-{index}",  # an empty feature cache for each pass
            [f"evaluation.batch_size={batch}"],
        )
        out = args.out / ("features" if index == 0 else f"features-{index}")
        features = extract_features(config, args.out / "dataset", args.out / "backbone", out)
        rate = features.texts_per_second or 0.0
        tflops = (flops["linear"] + flops["attention"]) * rate / len(every) / 1e12
        extract = {
            "batch_size": batch,
            "texts_per_second": rate,
            "rows": features.rows,
            "mean_tokens": round(float(every.mean()), 2),
            "precision": features.precision,
            "model_tflops": round(tflops, 2),
            "mfu": round(tflops / peak, 4),
        }
        report["extract"].append(extract)
        print(json.dumps({"extract": extract}), flush=True)
    with contextlib.suppress(ImportError):  # the peer is optional here
        device = "cuda" if on_gpu else "cpu"
        peer = peer_extract(args.out / "backbone", args.out / "dataset", device)
        report["peer_extract"] = {
            "peer": "sentence-transformers encode(batch_size=32) fp32",
            "texts_per_second": round(peer, 1),
        }
        print(json.dumps({"peer_extract": report["peer_extract"]}), flush=True)
    # Training FLOPs per example: forward and backward (≈ 2 × forward) over its true tokens.
    train_lengths = lengths["train"]
    per_example = 3 * (
        common.linear_flops_per_token(model_config) * float(train_lengths.mean())
        + common.attention_flops(model_config, train_lengths) / len(train_lengths)
    )

    from transferkit.training.distributed import world_size

    recipes = args.recipe or [""]
    if on_gpu and torch.cuda.device_count() > 1:  # the DDP runs against one GPU
        recipes = [*recipes, ",".join(filter(None, [recipes[0], "training.processes=1"]))]
    else:
        print("gpu_check: fewer than 2 GPUs: no data-parallel comparison")
    for index, recipe in enumerate(recipes):
        overrides = ["strategy.name=full_finetune", *filter(None, recipe.split(","))]
        config = config_for(args, args.out / "work", overrides)
        model_dir = args.out / f"model-{index}"
        started = time.perf_counter()
        trained = train(
            config, args.out / "dataset", args.out / "backbone", args.out / "features", model_dir
        )
        seconds = time.perf_counter() - started
        scored = evaluate(config, args.out / "dataset", model_dir, args.out / f"eval-{index}")
        run = {
            "recipe": recipe or "defaults",
            "learning_rate": config.training.learning_rate,
            "epochs": config.training.epochs,
            "batch_size": config.training.batch_size,
            "processes": world_size(config),
            "examples_per_second": trained.details["examples_per_second"],
            "model_tflops": round(per_example * trained.details["examples_per_second"] / 1e12, 2),
            "mfu": round(per_example * trained.details["examples_per_second"] / 1e12 / peak, 4),
            "train_seconds_wall": round(seconds, 1),
            "best_step": trained.details["best_step"],
            "best_validation_accuracy": round(trained.validation_metric, 4),
            "validations": trained.details["validations"],
            "dev_accuracy": round(scored.scores.metric("accuracy"), 4),
            "precision": trained.precision,
        }
        report["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "validations"}))
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
