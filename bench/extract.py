"""Feature extraction: transferkit's extract_features against sentence-transformers' encode.

All sides embed the same SST-2 sentences (20,000 training rows, split into train and
validation as ingest splits them, plus the 872-row GLUE dev split) with all-MiniLM-L6-v2 and
mean pooling, on the same machine with the same torch thread count:

- transferkit: ``extract_features`` on the ingested dataset, an empty feature cache each time,
  precision from ``training.precision`` ('auto': bf16 where the CPU has native bf16);
- peer at its best: ``SentenceTransformer(<folder>).bfloat16().encode(texts, batch_size=B)``,
  bf16 weights, with B the fastest of 16-256 measured on 2,048 sentences first;
- peer fp32: ``SentenceTransformer(<folder>).encode(texts, batch_size=32)``, its defaults.

Each repetition runs every side once; the side that leads rotates, so no side always runs
first or last. Printed: min / median / max sentences/s per side (a spread above 15 % is
flagged UNSTABLE), the median ratios against both peers (the headline is the best peer),
every embedding's cosine similarity to the fp32 peer's, the GLUE-dev accuracy of a logistic-
regression probe on each side's train vectors, and how busy the encoder's linear layers kept
the matrix units (model FLOPs / time, against the measured bf16 matmul rate).

    python bench/extract.py [--rows 20000] [--repeats 5] [--out bench/results/extract.json]
    python bench/extract.py --smoke       # the same on 200 + 100 rows, once (tests/bench)
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from transferkit.backbones import fetch_backbone
from transferkit.config import PipelineConfig, apply_overrides
from transferkit.data import SPLITS, ingest_data, load_split
from transferkit.features import extract_features, load_features

PEER_FP32 = "sentence-transformers fp32, batch 32"
PEER_BATCHES = (16, 32, 64, 128, 256)


def config(work: Path, data: Path, overrides: list[str]) -> PipelineConfig:
    raw: dict[str, Any] = {
        "data": {
            "train_uri": str(data / "train.tsv"),
            "test_uri": str(common.SST2 / "dev.tsv"),
            "text_column": "sentence",
            "label_names": {"0": "negative", "1": "positive"},
            "split": {"validation": 0.1},
        },
        "backbone": {"uri": common.backbone_uri()},
        "training": {"precision": "auto"},
        "runtime": {"work_dir": str(work)},
    }
    return PipelineConfig.model_validate(apply_overrides(raw, overrides)).resolved()


def probe_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray
) -> float:
    """GLUE-dev accuracy of an L2-regularised logistic regression on the vectors."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0, max_iter=2000)
    model.fit(train, y_train)
    return float((model.predict(test) == y_test).mean())


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(min=1e-12)


def our_encoder(cfg: PipelineConfig, backbone: Path) -> tuple[Any, Any, str, int]:
    """(tokenizer, encoder, precision, max length) exactly as extract_features runs them."""
    from transferkit.backbones import load_backbone_info
    from transferkit.backbones.encoder import load_text_encoder
    from transferkit.backbones.text import frozen_encoder, resolve_precision

    info = load_backbone_info(backbone)
    tokenizer, loaded = load_text_encoder(backbone / "model", info.pooling, info.normalize)
    encoder, precision = frozen_encoder(
        loaded.to(common.device()), resolve_precision(cfg.training.precision)
    )
    return tokenizer, encoder, precision, info.max_length


def linear_layer_rate(cfg: PipelineConfig, backbone: Path, texts: list[str]) -> dict[str, float]:
    """Time inside the encoder's linear layers (CPU profiler) against the FLOPs they executed.

    The FLOPs count the padded tokens each length-sorted batch really multiplies.
    """
    from torch.profiler import ProfilerActivity, profile

    from transferkit.backbones.text import length_sorted_batches, run_batched, tokenize

    tokenizer, encoder, precision, max_length = our_encoder(cfg, backbone)
    batch = cfg.evaluation.batch_size
    lengths = np.array([len(x) for x in tokenize(tokenizer, texts, max_length)])
    padded = sum(len(b) * int(lengths[b].max()) for b in length_sorted_batches(lengths, batch))
    run_batched(encoder, tokenizer, texts[:batch], max_length, batch, precision)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_batched(encoder, tokenizer, texts, max_length, batch, precision)
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    linear_us = sum(e.self_cpu_time_total for e in events if e.key in ("aten::addmm", "aten::mm"))
    flops = common.linear_flops_per_token(encoder.body.config) * padded
    return {
        "profiled_texts": len(texts),
        "linear_share_of_time": round(linear_us / max(total_us, 1), 3),
        "linear_tflops": round(flops / (linear_us / 1e6) / 1e12, 3),
    }


def warm_up(cfg: PipelineConfig, backbone: Path, texts: list[str], peers: list[Any]) -> None:
    """Encode some texts with each side, untimed: first-use costs (kernel selection for each
    new shape, allocator growth, page cache) must not land on whichever side runs first."""
    from transferkit.backbones.text import run_batched

    tokenizer, encoder, precision, max_length = our_encoder(cfg, backbone)
    run_batched(encoder, tokenizer, texts, max_length, cfg.evaluation.batch_size, precision)
    for peer in peers:
        peer.encode(texts, batch_size=32)


def best_batch(peer: Any, texts: list[str]) -> tuple[int, dict[int, float]]:
    """The peer's fastest batch size on ``texts`` (sentences/s per size, measured once)."""
    rates = {}
    for size in PEER_BATCHES:
        seconds, _ = common.timed(functools.partial(peer.encode, texts, batch_size=size))
        rates[size] = round(len(texts) / seconds, 1)
    return max(rates, key=rates.__getitem__), rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="SST-2 training rows embedded")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a tiny run: the first {common.SMOKE_TRAIN_ROWS} training and "
        f"{common.SMOKE_TEST_ROWS} dev rows, one repetition (its figures mean nothing)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.repeats = common.SMOKE_TRAIN_ROWS, 1
    logging.basicConfig(level=logging.WARNING)
    from sentence_transformers import SentenceTransformer

    report: dict[str, Any] = {
        "benchmark": "extract",
        "machine": common.machine(common.device(), args.smoke),
        "runs": [],
    }
    print(f"machine: {report['machine']}")
    scratch = Path(tempfile.mkdtemp(prefix="tk-bench-extract-"))
    try:
        if args.smoke:
            common.smoke_data(scratch / "smoke-sst2")
        texts, labels = common.sst2_sentences(args.rows)
        data = scratch / "data"
        data.mkdir()
        lines = ["sentence\tlabel", *(f"{t}\t{y}" for t, y in zip(texts, labels, strict=True))]
        (data / "train.tsv").write_text("\n".join(lines) + "\n")
        cfg = config(scratch / "work-0", data, args.overrides)
        ingest_data(cfg, scratch / "dataset")
        fetch_backbone(cfg, scratch / "backbone")
        splits = {s: load_split(scratch / "dataset", s) for s in SPLITS}
        count = sum(len(t) for t, _ in splits.values())
        peer_model = SentenceTransformer(str(common.minilm_folder()), device=common.device())
        peer_model.float()  # the peer is fp32 whatever the checkpoint stores (a GPU copy is fp16)
        peer_model.max_seq_length = cfg.backbone.max_length

        peer_bf16 = SentenceTransformer(str(common.minilm_folder()), device=common.device())
        peer_bf16.bfloat16()  # sentence-transformers' documented bf16 path: bf16 weights
        peer_bf16.max_seq_length = cfg.backbone.max_length

        # A GPU meets a new kernel choice at every new padded width: warm it on every text.
        warm = splits["train"][0] if common.device() == "cuda" else splits["train"][0][:2048]
        warm_up(cfg, scratch / "backbone", warm, [peer_model, peer_bf16])
        batch, batch_rates = (32, {}) if args.smoke else best_batch(peer_bf16, warm)
        report["peer_bf16_batch_rates"] = batch_rates
        best_name = f"sentence-transformers bf16, batch {batch}"
        print(f"{best_name}: the fastest of {batch_rates or 'none (smoke run)'}", flush=True)
        rates: dict[str, list[float]] = {"transferkit": [], "peer_bf16": [], "peer_fp32": []}
        vectors: dict[str, dict[str, np.ndarray]] = {}
        step_walls: list[float] = []

        def run_ours(index: int) -> dict[str, np.ndarray]:
            run_cfg = config(scratch / f"work-{index}", data, args.overrides)
            shutil.rmtree(scratch / "features", ignore_errors=True)
            seconds, result = common.timed(
                functools.partial(
                    extract_features,
                    run_cfg,
                    scratch / "dataset",
                    scratch / "backbone",
                    scratch / "features",
                )
            )
            assert not result.cache_hit
            assert result.texts_per_second
            # Encoding time only, as for the peers: model loading (and compiling) and file
            # writes excluded (the step's wall, with them, is recorded beside it).
            rates["transferkit"].append(result.texts_per_second)
            step_walls.append(seconds)
            report["ours_runtime"] = result.runtime
            report["ours_precision"] = result.precision
            return {s: load_features(scratch / "features", s) for s in SPLITS}

        def run_peer(model: Any, size: int, name: str) -> dict[str, np.ndarray]:
            seconds, out = common.timed(
                lambda: {
                    s: model.encode(t, batch_size=size, convert_to_numpy=True)
                    for s, (t, _) in splits.items()
                }
            )
            rates[name].append(count / seconds)
            return out

        sides = {
            "transferkit": run_ours,
            "peer_bf16": lambda index: run_peer(peer_bf16, batch, "peer_bf16"),
            "peer_fp32": lambda index: run_peer(peer_model, args.peer_batch_size, "peer_fp32"),
        }
        for index in range(args.repeats):
            order = common.rotated(list(sides), index)
            for name in order:
                vectors[name] = sides[name](index)
            run = {name: round(rates[name][-1], 1) for name in sides}
            report["runs"].append({"order": order, **run, "ours_step_wall_s": step_walls[-1]})
            print(f"repetition {index + 1} ({' > '.join(order)}): {run}", flush=True)

        ours_vectors, peer_vectors = vectors["transferkit"], vectors["peer_fp32"]
        cosine = np.concatenate(
            [np.sum(unit(ours_vectors[s]) * unit(peer_vectors[s]), axis=1) for s in SPLITS]
        )
        y = {s: labels_ for s, (_, labels_) in splits.items()}
        ours_acc = probe_accuracy(
            ours_vectors["train"], y["train"], ours_vectors["test"], y["test"]
        )
        peer_acc = probe_accuracy(
            peer_vectors["train"], y["train"], peer_vectors["test"], y["test"]
        )
        bf16_acc = probe_accuracy(
            vectors["peer_bf16"]["train"], y["train"], vectors["peer_bf16"]["test"], y["test"]
        )
        ours, best, peer = (common.median(rates[n]) for n in sides)

        from transferkit.backbones.text import tokenize

        tokenizer = peer_model.tokenizer
        every = [t for s in SPLITS for t in splits[s][0]]
        lengths = np.array([len(x) for x in tokenize(tokenizer, every, cfg.backbone.max_length)])
        flops = common.encoder_flops(cast(Any, peer_model[0]).auto_model.config, lengths)
        achieved = flops["linear"] * ours / count / 1e12
        ceiling = report["machine"]["bf16_matmul_tflops"]
        rate: dict[str, float] = {}
        if common.device() == "cpu":  # the CPU profiler's op times mean nothing for a GPU
            profiled = every[: 64 if args.smoke else 4000]
            rate = linear_layer_rate(cfg, scratch / "backbone", profiled)
            rate["fraction_of_bf16_matmul_in_linear_layers"] = round(
                rate["linear_tflops"] / ceiling, 3
            )
        report["summary"] = {
            "texts": count,
            "mean_tokens": round(float(lengths.mean()), 2),
            "ours_per_s": round(ours, 1),
            "best_peer_per_s": round(best, 1),
            "peer_per_s": round(peer, 1),
            "best_peer": best_name,
            "ratio_to_best_peer": round(ours / best, 2),
            "ratio": round(ours / peer, 2),
            "repetitions": {name: common.spread(values) for name, values in rates.items()},
            "cosine_min": round(float(cosine.min()), 6),
            "cosine_mean": round(float(cosine.mean()), 6),
            "probe_accuracy_ours": round(ours_acc, 4),
            "probe_accuracy_peer": round(peer_acc, 4),
            "probe_accuracy_best_peer": round(bf16_acc, 4),
            "linear_tflops_whole_pass": round(achieved, 3),
            "fraction_of_bf16_matmul_whole_pass": round(achieved / ceiling, 3),
            **rate,
        }
        summary = report["summary"]
        print(f"sentences/s over {args.repeats} repetitions (side leading in turn):")
        for name, values in rates.items():
            print(common.spread_line(name, values, "sentences/s"))
        print(common.ratio_line("extraction", ours, best, "sentences/s", best_name))
        print(common.ratio_line("extraction", ours, peer, "sentences/s", PEER_FP32))
        print(
            f"cosine to fp32 peer: min {summary['cosine_min']:.6f} mean "
            f"{summary['cosine_mean']:.6f} (target min >= 0.999)"
        )
        print(
            f"probe accuracy on GLUE dev: transferkit {ours_acc:.4f} | peer fp32 {peer_acc:.4f} "
            f"| peer bf16 {bf16_acc:.4f} | difference to fp32 {100 * (ours_acc - peer_acc):+.2f} "
            "points (target within 0.3)"
        )
        if rate:
            print(
                "torch's bf16 path, profiled: linear layers at "
                f"{rate['linear_tflops']:.3f} TFLOP/s while in them "
                f"({rate['fraction_of_bf16_matmul_in_linear_layers']:.0%} of the measured bf16 "
                f"matmul {ceiling} TFLOP/s; {rate['linear_share_of_time']:.0%} of encode time)"
            )
        print(
            f"linear-layer FLOPs over the whole pass: {achieved:.3f} TFLOP/s "
            f"({summary['fraction_of_bf16_matmul_whole_pass']:.1%} of the measured bf16 matmul)"
        )
        met = {
            "ratio to best peer >= 1.5": ours / best >= 1.5,
            "ratio to fp32 peer >= 3.4": ours / peer >= 3.4,
            "cosine >= 0.999": cosine.min() >= 0.999,
            "probe within 0.3 points": abs(ours_acc - peer_acc) <= 0.003,
        }
        print("targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items()))
        common.save(args.out, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
