"""The quickstart in containers: every step in the transferkit image vs every step a subprocess.

Both sides are ``transferkit run CONFIG --set runtime.work_dir=<fresh dir>`` started the same
way from the repository root and timed from start to exit, in one run of this script:

- subprocess (the peer): KFP's ``SubprocessRunner``, the default.
- containers: ``runtime.runner=docker``: KFP's ``DockerRunner``, each step in
  ``ghcr.io/transferkit/transferkit-cpu:<version>`` through the Docker API at DOCKER_HOST
  (Docker's, or podman's ``podman system service --time=0 unix:///…/podman.sock``; the image
  built by ``images/build.sh cpu`` from this tree).

Every repetition uses fresh work dirs (cold feature cache, KFP cache and MLflow store) and
alternates which side goes first. Printed: both walls and test metrics per repetition, the
per-step medians, and containers ÷ subprocess (target ≤ 1.5x); the metrics must be equal.
Nothing is asserted.

    DOCKER_HOST=unix:///path/podman.sock python bench/quickstart_containers.py
        [--config examples/sst2-quickstart.yaml] [--repeats 1] [--set data.max_rows=2000]
        [--out FILE] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

from transferkit.runner import STEPS

DEFAULT_CONFIG = "examples/sst2-quickstart.yaml"
RATIO_TARGET = 1.5
SIDES = ("subprocess", "containers")


def run_side(
    side: str, config: str, overrides: list[str], folder: Path
) -> tuple[float, dict[str, Any]]:
    """One ``transferkit run`` with this side's runner in a fresh work dir: wall, summary."""
    work_dir, summary = folder / f"{side}-work", folder / f"{side}-summary.json"
    runner = "docker" if side == "containers" else "subprocess"
    pairs = [*overrides, f"runtime.work_dir={work_dir}", f"runtime.runner={runner}"]
    command = [*common.transferkit_command(), "run", config, "--summary", str(summary)]
    command += [arg for pair in pairs for arg in ("--set", pair)]
    log = folder / f"{side}.out"
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        done = subprocess.run(
            command, cwd=common.ROOT, stdout=sink, stderr=subprocess.STDOUT, check=False
        )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}; end of {log}:\n{tail}")
    return wall, json.loads(summary.read_text())


def repetition(index: int, args: argparse.Namespace, root: Path, metric: str) -> dict[str, Any]:
    folder = root / f"rep-{index}"
    folder.mkdir()
    result: dict[str, Any] = {}
    for side in common.rotated(list(SIDES), index - 1):
        wall, summary = run_side(side, args.config, args.overrides, folder)
        result[side] = {
            "wall": wall,
            "steps": summary["step_seconds"],
            "metric": summary["metrics"][f"test_{metric}"],
            "model_uri": summary["model_uri"],
            "cached": summary["cached_steps"],
        }
    sub, box = result["subprocess"], result["containers"]
    print(
        f"rep {index}: subprocess {sub['wall']:.1f} s, test {metric} {sub['metric']:.4f} | "
        f"containers {box['wall']:.1f} s, test {metric} {box['metric']:.4f}",
        flush=True,
    )
    return result


def summarise(reps: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    sub = common.median([r["subprocess"]["wall"] for r in reps])
    box = common.median([r["containers"]["wall"] for r in reps])
    ratio = box / sub
    print(f"\n  {'step':<18}{'subprocess s':>14}{'containers s':>14}")
    for step in STEPS:
        s = common.median([r["subprocess"]["steps"][step] for r in reps])
        c = common.median([r["containers"]["steps"][step] for r in reps])
        print(f"  {step:<18}{s:>14.1f}{c:>14.1f}")
    print()
    print(common.ratio_line("quickstart wall, containers", box, sub, "s", "subprocess"))
    met = ratio <= RATIO_TARGET
    print(
        f"  containers ÷ subprocess {ratio:.2f}x — target ≤ {RATIO_TARGET:g}x: "
        f"{'met' if met else 'not met'}"
    )
    same = all(r["subprocess"]["metric"] == r["containers"]["metric"] for r in reps)
    print(f"  test {metric}: {'equal on both sides' if same else 'DIFFERENT'}")
    return {
        "subprocess_wall_median": sub,
        "containers_wall_median": box,
        "ratio_containers_over_subprocess": ratio,
        "ratio_target": RATIO_TARGET,
        "ratio_target_met": met,
        "metrics_equal": same,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.run_parser((__doc__ or "").splitlines()[0], DEFAULT_CONFIG, repeats=1)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        raise SystemExit("no Docker API: set DOCKER_HOST (e.g. podman system service's socket)")
    from transferkit.config import load_config

    config = load_config(common.ROOT / args.config, args.overrides)
    metric = config.evaluation.primary_metric
    with common.work_dirs("transferkit-bench-containers-", args.keep) as root:
        print(f"{args.config} {' '.join(args.overrides)}: {args.repeats} repetitions in {root}")
        reps = [repetition(i + 1, args, root, metric) for i in range(args.repeats)]
        report = {
            "benchmark": "the quickstart in containers (DockerRunner) vs subprocesses",
            "config": args.config,
            "overrides": args.overrides,
            "repetitions": reps,
            **summarise(reps, metric),
            "machine": common.machine(),
        }
    common.save(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
