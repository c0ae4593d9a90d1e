"""Sentence pairs scored 0-5 (STS Benchmark, official splits): transferkit's pair path against
sentence-transformers with scikit-learn's Ridge, on the same pairs and the same MiniLM.

Both sides embed both sentences of every train, dev and test pair with the frozen
all-MiniLM-L6-v2, score the test pairs by the cosine of their two embeddings (zero-shot), and
fit a ridge regression on the pair features [u, v, |u - v|, u * v] of the unit-length
embeddings over the same penalty grid, keeping the penalty with the best dev Spearman.
- transferkit: the library steps a run executes (ingest_data reading the headerless STS
  files, extract_features writing the pair features, its cache empty; fit_ridge), scored by
  transferkit.regression;
- peer: ``SentenceTransformer.encode`` (the same batch size) with ``normalize_embeddings``,
  then ``StandardScaler`` + ``Ridge(alpha)`` once per penalty, scored by scipy's spearmanr,
  as a user of those libraries would write it.

Printed: each side's seconds (embedding and the ridge grid), their ratio, and each side's
test Spearman × 100 for the zero-shot cosine (MTEB reports 82.0 for this model) and the ridge.

    python bench/stsb.py [--out bench/results/stsb-cpu.json]
    python bench/stsb.py --smoke          # 200 / 100 / 100 pairs (tests/bench)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from transferkit.config import LinearProbeConfig

STSB = Path(
    os.environ.get("TRANSFERKIT_BENCH_STSB", common.ROOT.parent / "shared" / "data" / "stsb")
)
COLUMNS = ["genre", "file", "year", "id", "score", "sentence1", "sentence2"]
FILES = {"train": "sts-train.csv", "validation": "sts-dev.csv", "test": "sts-test.csv"}
ALPHAS = LinearProbeConfig().ridge_alphas  # the grid a run's linear_probe tries
BATCH = 128


def pairs(folder: Path, rows: int | None) -> dict[str, Path]:
    """The STS-B files, or their first ``rows`` lines, in ``folder``; split → path."""
    out = {}
    for split, name in FILES.items():
        lines = (STSB / name).read_text(encoding="utf-8").splitlines()
        path = folder / name
        path.write_text("\n".join(lines[:rows] if rows else lines) + "\n", encoding="utf-8")
        out[split] = path
    return out


def ours(files: dict[str, Path], work: Path) -> dict[str, Any]:
    from transferkit.backbones import fetch_backbone
    from transferkit.config import PipelineConfig
    from transferkit.data import ingest_data, load_labels
    from transferkit.features import extract_features, load_features
    from transferkit.regression import score_regression
    from transferkit.training.ridge import fit_ridge

    config = PipelineConfig.model_validate(
        {
            "task": "regression",
            "data": {
                "train_uri": str(files["train"]),
                "validation_uri": str(files["validation"]),
                "test_uri": str(files["test"]),
                "format": "tsv",
                "columns": COLUMNS,
                "text_column": "sentence1",
                "text_pair_column": "sentence2",
                "label_column": "score",
            },
            "backbone": {"uri": common.backbone_uri(), "max_length": 128},
            "evaluation": {"batch_size": BATCH},
            "runtime": {"work_dir": str(work), "feature_cache": str(work / "cache")},
        }
    ).resolved()
    fetch_backbone(config, work / "backbone")
    started = time.perf_counter()
    ingest_data(config, work / "dataset")
    extract_features(config, work / "dataset", work / "backbone", work / "features")
    embedded = time.perf_counter()
    x = {s: load_features(work / "features", s) for s in FILES}
    y = {s: load_labels(work / "dataset", s) for s in FILES}
    head, fit = fit_ridge(
        x["train"], y["train"], x["validation"], y["validation"], ALPHAS, "spearman"
    )
    import torch

    with torch.no_grad():
        predicted = head(torch.from_numpy(x["test"])).numpy()[:, 0]
    done = time.perf_counter()
    width = x["test"].shape[1] // 4
    cosine = x["test"][:, 3 * width :].sum(axis=1)  # the products of unit vectors
    return {
        "embed_seconds": embedded - started,
        "ridge_seconds": done - embedded,
        "zero_shot_spearman": score_regression(y["test"], cosine).spearman,
        "ridge_spearman": score_regression(y["test"], predicted).spearman,
        "alpha": fit.alpha,
    }


def _read(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    return (
        [r[5].strip() for r in rows],
        [r[6].strip() for r in rows],
        np.array([float(r[4]) for r in rows]),
    )


def peer(files: dict[str, Path]) -> dict[str, Any]:
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    model = SentenceTransformer(str(common.minilm_folder()), device=common.device())
    model.max_seq_length = 128
    started = time.perf_counter()
    features, targets, cosines = {}, {}, {}
    for split, path in files.items():
        first, second, score = _read(path)
        u, v = (
            model.encode(texts, batch_size=BATCH, normalize_embeddings=True)
            for texts in (first, second)
        )
        features[split] = np.concatenate([u, v, np.abs(u - v), u * v], axis=1)
        targets[split], cosines[split] = score, (u * v).sum(axis=1)
    embedded = time.perf_counter()
    scaler = StandardScaler().fit(features["train"])
    train, dev = scaler.transform(features["train"]), scaler.transform(features["validation"])
    best: tuple[float, float, Any] | None = None
    for alpha in sorted(ALPHAS, reverse=True):
        ridge = Ridge(alpha=alpha).fit(train, targets["train"])
        value = float(spearmanr(targets["validation"], ridge.predict(dev)).statistic)
        if best is None or value > best[1]:
            best = (alpha, value, ridge)
    assert best is not None
    predicted = best[2].predict(scaler.transform(features["test"]))
    done = time.perf_counter()
    return {
        "embed_seconds": embedded - started,
        "ridge_seconds": done - embedded,
        "zero_shot_spearman": float(spearmanr(targets["test"], cosines["test"]).statistic),
        "ridge_spearman": float(spearmanr(targets["test"], predicted).statistic),
        "alpha": best[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument("--smoke", action="store_true", help="the first 100-200 pairs of each")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "stsb",
        "machine": common.machine(common.device(), args.smoke),
        "alphas": ALPHAS,
    }
    print(f"machine: {report['machine']}")
    with tempfile.TemporaryDirectory(prefix="bench-stsb-") as scratch:
        folder = Path(scratch)
        files = pairs(folder, 200 if args.smoke else None)
        if args.smoke:  # dev and test: the first 100 pairs
            for split in ("validation", "test"):
                lines = files[split].read_text(encoding="utf-8").splitlines()[:100]
                files[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
        rows = {s: len(p.read_text(encoding="utf-8").splitlines()) for s, p in files.items()}
        report["pairs"] = rows
        print(f"pairs: {rows} (sts-train / sts-dev / sts-test)")
        results = {
            "transferkit": ours(files, folder / "ours"),
            "sentence-transformers": peer(files),
        }
    report["results"] = {
        name: {k: common.significant(v) for k, v in r.items()} for name, r in results.items()
    }
    mine, theirs = results["transferkit"], results["sentence-transformers"]
    for key, what in (("embed_seconds", "embed both texts"), ("ridge_seconds", "ridge grid")):
        print(
            f"{what}: transferkit {mine[key]:.2f} s | sentence-transformers + scikit-learn "
            f"{theirs[key]:.2f} s | ratio {theirs[key] / mine[key]:.2f}x faster"
        )
    for key, what in (("zero_shot_spearman", "zero-shot cosine"), ("ridge_spearman", "ridge")):
        print(
            f"test Spearman x 100, {what}: transferkit {100 * mine[key]:.2f} | "
            f"sentence-transformers {100 * theirs[key]:.2f} | difference "
            f"{100 * (mine[key] - theirs[key]):+.2f}"
        )
    report["ratio_embed"] = round(theirs["embed_seconds"] / mine["embed_seconds"], 2)
    common.save(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
