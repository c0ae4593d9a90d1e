"""Scale: ingest_data and extract_features over 100,000 and 1,000,000 generated text rows.

Each step runs in a child process of its own, as in the pipeline (one pod or subprocess per
step), called as its component calls it. For each size it prints the step's wall time and the
child's peak resident memory (the kernel's ru_maxrss for that process), and at the end the
ratio of the largest size's time to the smallest's, against the size ratio: time growing
linearly means 1M rows take about 10× (target ≤ 11×) the time of 100k, and the peak memory
must stay under 3 GiB (target) however many rows there are.

The rows come from bench/generate_rows.py (SST-2-like lengths), written once per size into
``--data-dir`` and reused.

    python bench/scale.py [--sizes 100000 1000000] [--data-dir /tmp/transferkit-scale]
        [--out bench/results/scale.json]
    python bench/scale.py --smoke         # 100 and 1,000 rows in a temporary dir (tests/bench)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import generate_rows

from transferkit.config import PACKAGED_MINILM, PipelineConfig

MEMORY_TARGET_GIB = 3.0
LINEAR_SLACK = 1.1  # 10× the rows may take at most 11× the time


def config(rows_file: Path, work: Path) -> PipelineConfig:
    """The pipeline's text defaults on one file, split 90/5/5 as data.split carves it."""
    return PipelineConfig.model_validate(
        {
            "data": {
                "uri": str(rows_file),
                "text_column": "sentence",
                "split": {"validation": 0.05, "test": 0.05},
            },
            "backbone": {"uri": PACKAGED_MINILM},
            "training": {"precision": "auto"},
            "runtime": {"work_dir": str(work)},
        }
    ).resolved()


def child(step: str, rows_file: Path, work: Path) -> int:
    """One step, in this process (started by ``measure``), as its component runs it."""
    cfg = config(rows_file, work)
    if step == "ingest_data":
        from transferkit.data import ingest_data

        ingest_data(cfg, work / "dataset")
    elif step == "fetch_backbone":
        from transferkit.backbones import fetch_backbone

        fetch_backbone(cfg, work / "backbone")
    else:
        from transferkit.features import extract_features

        extract_features(cfg, work / "dataset", work / "backbone", work / "features")
    return 0


def measure(step: str, rows_file: Path, work: Path) -> dict[str, Any]:
    """Wall seconds and peak RSS of one step run in a child process."""
    command = [sys.executable, __file__, "--child", step, str(rows_file), str(work)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=common.ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{step} on {rows_file.name} failed with exit code {process.returncode}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def run_size(rows: int, data_dir: Path) -> dict[str, Any]:
    rows_file = data_dir / f"rows-{rows}.tsv"
    if not rows_file.exists():
        generate_rows.generate(rows, rows_file)
    work = data_dir / f"work-{rows}"
    shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {"rows": rows, "file_mib": round(rows_file.stat().st_size / 2**20, 1)}
    for step in ("ingest_data", "fetch_backbone", "extract_features"):
        result[step] = measure(step, rows_file, work)
        print(f"{rows:>9,} rows  {step:<17} {result[step]}", flush=True)
    features = json.loads((work / "features" / "features.json").read_text())
    result["texts_per_second"] = features["texts_per_second"]
    result["features_mib"] = round(
        sum(f.stat().st_size for f in (work / "features").glob("*.npy")) / 2**20, 1
    )
    result["seconds"] = round(
        result["ingest_data"]["seconds"] + result["extract_features"]["seconds"], 1
    )
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/transferkit-scale"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("STEP", "ROWS_FILE", "WORK"))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run: 100 and 1,000 rows in a temporary --data-dir (figures mean nothing)",
    )
    args = parser.parse_args()
    if args.child:
        step, rows_file, work = args.child
        return child(step, Path(rows_file), Path(work))
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="transferkit-scale-smoke-") as scratch:
            return measure_sizes([100, 1_000], Path(scratch), args.out, smoke=True)
    return measure_sizes(args.sizes, args.data_dir, args.out)


def measure_sizes(sizes: list[int], data_dir: Path, out: Path | None, smoke: bool = False) -> int:
    """Run every size, print the verdicts and save the report."""
    data_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_size(rows, data_dir) for rows in sorted(sizes)]
    small, large = runs[0], runs[-1]
    peak = max(r[s]["peak_rss_mib"] for r in runs for s in ("ingest_data", "extract_features"))
    size_ratio = large["rows"] / small["rows"]
    time_ratio = large["seconds"] / small["seconds"]
    print(
        f"ingest + extraction: {large['rows']:,} rows {large['seconds']:,.1f} s | "
        f"{small['rows']:,} rows {small['seconds']:,.1f} s | ratio {time_ratio:.2f}x for "
        f"{size_ratio:.0f}x the rows (target <= {LINEAR_SLACK * size_ratio:.0f}x: "
        f"{'met' if time_ratio <= LINEAR_SLACK * size_ratio else 'NOT met'})"
    )
    print(
        f"peak RSS of a step: {peak / 1024:.2f} GiB (target <= {MEMORY_TARGET_GIB} GiB: "
        f"{'met' if peak / 1024 <= MEMORY_TARGET_GIB else 'NOT met'})"
    )
    report = {
        "benchmark": "scale",
        "machine": common.machine(smoke=smoke),
        "runs": runs,
        "time_ratio": round(time_ratio, 2),
        "size_ratio": size_ratio,
        "peak_rss_gib": round(peak / 1024, 2),
    }
    common.save(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
