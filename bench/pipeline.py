"""Pipeline overhead: the quickstart through KFP's local runner vs the same steps in one process.

Both sides are child processes started the same way from the repository root and timed from
start to exit, so Python start-up and imports count on both:

- KFP: ``transferkit run CONFIG --set runtime.work_dir=<fresh dir>``: every step a subprocess of
  ``kfp.local.SubprocessRunner``, with KFP's local cache. Then the identical command again in the
  same work dir: the cached rerun (register_model always runs; every other step should be a
  cache hit).
- KFP cold: the same first run with ``--set runtime.warm_start=false``: every step a fresh
  Python, as KFP's ``SubprocessRunner`` starts it (``transferkit run`` forks its steps from a
  warm helper by default, ``transferkit.warm_steps``).
- plain (the peer): ``python bench/pipeline.py --plain CONFIG WORKDIR`` loads the same config
  and calls the core functions in DAG order exactly as the components do — ingest_data,
  fetch_backbone, extract_features, train, evaluate, register_model — with the same MLflow
  store (a SQLite file in its work dir), and registers a model too.

Every repetition uses fresh work dirs, so the feature cache, KFP's cache and the MLflow store
are cold; the order within a repetition is plain, KFP first run, KFP cached rerun, KFP cold.
Printed: the walls per repetition with the test metrics, the per-step times, and the medians:
KFP wall ÷ plain wall (target ≤ 1.2x), first run ÷ cached rerun (target ≥ 10x) and cold ÷ warm
first run. Nothing is asserted.

    python bench/pipeline.py [--config examples/sst2-quickstart.yaml] [--repeats 3]
        [--out FILE] [--set data.max_rows=2000 ...] [--keep]
    python bench/pipeline.py --smoke      # 200 training + 100 dev rows, once (tests/bench)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import common

from transferkit.runner import STEPS

DEFAULT_CONFIG = "examples/sst2-quickstart.yaml"
RATIO_TARGET = 1.2
SPEEDUP_TARGET = 10.0
# register_model has side effects in MLflow, and open_run and close_run open and end the run's
# MLflow run: the pipeline never caches them.
ALWAYS_RUNS = ("open_run", "register_model", "close_run")


# ------------------------------------------------------------------------------ plain process


def plain(config_path: str, work_dir: Path, overrides: list[str]) -> int:
    """The peer: the eight core functions in one process, called as the components call them."""
    from transferkit import config as cfg
    from transferkit.runner import _child_environment

    loaded = cfg.load_config(config_path, [*overrides, f"runtime.work_dir={work_dir}"])
    # The environment `transferkit run` gives its steps (offline hub, no tokenizer threads …),
    # set before the libraries that read it at import are imported.
    _child_environment(loaded)
    from transferkit.pipelines import PIPELINE_NAME

    from transferkit.backbones import fetch_backbone
    from transferkit.cli import configure_logging
    from transferkit.data import ingest_data
    from transferkit.evaluation import evaluate
    from transferkit.features import extract_features
    from transferkit.registry import register_model
    from transferkit.storage import CACHE_ENV
    from transferkit.tracking import close_run, open_run
    from transferkit.training import train

    configure_logging()
    # What a component receives: the resolved config as a KFP parameter, validated again.
    config = cfg.PipelineConfig.model_validate(loaded.resolved().as_parameter())
    out = work_dir / "plain"
    out.mkdir(parents=True, exist_ok=True)
    dataset, backbone, features = out / "dataset", out / "backbone", out / "features"
    model, evaluation = out / "model", out / "evaluation"
    cache = os.environ.get(CACHE_ENV)
    run_id = "plain-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    seconds: dict[str, float] = {}

    def step(name: str, call: Callable[[], Any]) -> Any:
        took, result = common.timed(call)
        seconds[name] = round(took, 3)
        return result

    opened = step("open_run", lambda: open_run(config, run_id, PIPELINE_NAME))
    step("ingest_data", lambda: ingest_data(config, dataset))
    step(
        "fetch_backbone",
        lambda: fetch_backbone(config, backbone, dataset, Path(cache) if cache else None),
    )
    step("extract_features", lambda: extract_features(config, dataset, backbone, features))
    step("train", lambda: train(config, dataset, backbone, features, model))
    step("evaluate", lambda: evaluate(config, dataset, model, evaluation))
    registration = step(
        "register_model",
        lambda: register_model(
            config,
            dataset,
            backbone,
            model,
            evaluation,
            run_id,
            out / "registration.json",
            opened,
        ),
    )
    step("close_run", lambda: close_run(config, run_id, "SUCCEEDED"))
    summary = {
        "metrics": registration.metrics,
        "model_uri": registration.model_uri,
        "tracking_uri": registration.tracking_uri,
        "step_seconds": seconds,
    }
    (work_dir / "plain-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


# ------------------------------------------------------------------------------------ parent


def child(command: list[str], log: Path) -> float:
    """Run a command from the repository root, output to ``log``; its wall seconds."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        done = subprocess.run(
            command, cwd=common.ROOT, stdout=sink, stderr=subprocess.STDOUT, check=False
        )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}; end of {log}:\n{tail}")
    return wall


def sets(overrides: list[str], work_dir: Path) -> list[str]:
    """``--set`` arguments: the user's, then the work dir (last, so it wins)."""
    pairs = [*overrides, f"runtime.work_dir={work_dir}"]
    return [arg for pair in pairs for arg in ("--set", pair)]


def run_plain(config: str, work_dir: Path, overrides: list[str]) -> tuple[float, dict[str, Any]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--plain", config, str(work_dir)]
    command += [arg for pair in overrides for arg in ("--set", pair)]
    work_dir.mkdir(parents=True)
    wall = child(command, work_dir.parent / "plain.out")
    return wall, json.loads((work_dir / "plain-summary.json").read_text())


def run_kfp(
    config: str, work_dir: Path, overrides: list[str], tag: str
) -> tuple[float, dict[str, Any]]:
    summary = work_dir.parent / f"kfp-{tag}-summary.json"
    command = [*common.transferkit_command(), "run", config, *sets(overrides, work_dir)]
    wall = child([*command, "--summary", str(summary)], work_dir.parent / f"kfp-{tag}.out")
    return wall, json.loads(summary.read_text())


def outside(wall: float, step_seconds: dict[str, float]) -> float:
    """Seconds of a run spent outside its steps: start-up, imports, orchestration."""
    return wall - sum(step_seconds.values())


def repetition(index: int, args: argparse.Namespace, root: Path, metric: str) -> dict[str, Any]:
    """One plain run, one KFP first run and its cached rerun, each in fresh work dirs."""
    folder = root / f"rep-{index}"
    folder.mkdir()
    plain_wall, plain_summary = run_plain(args.config, folder / "plain-work", args.overrides)
    kfp_dir = folder / "kfp-work"
    first_wall, first = run_kfp(args.config, kfp_dir, args.overrides, "first")
    rerun_wall, rerun = run_kfp(args.config, kfp_dir, args.overrides, "rerun")
    cold_overrides = [*args.overrides, "runtime.warm_start=false"]
    cold_wall, cold = run_kfp(args.config, folder / "kfp-cold-work", cold_overrides, "cold")
    expected = [s for s in STEPS if s not in ALWAYS_RUNS]
    key = f"test_{metric}"
    result = {
        "plain_wall": plain_wall,
        "kfp_first_wall": first_wall,
        "kfp_rerun_wall": rerun_wall,
        "kfp_cold_wall": cold_wall,
        "kfp_cold_steps": cold["step_seconds"],
        "kfp_cold_metric": cold["metrics"][key],
        "plain_steps": plain_summary["step_seconds"],
        "kfp_first_steps": first["step_seconds"],
        "kfp_rerun_steps": rerun["step_seconds"],
        "kfp_first_cached": first["cached_steps"],
        "kfp_rerun_cached": rerun["cached_steps"],
        "kfp_rerun_ran": [s for s in STEPS if s not in rerun["cached_steps"]],
        "rerun_cache_ok": rerun["cached_steps"] == expected and not first["cached_steps"],
        "plain_metric": plain_summary["metrics"][key],
        "kfp_metric": first["metrics"][key],
        "kfp_rerun_metric": rerun["metrics"][key],
        "plain_model_uri": plain_summary["model_uri"],
        "kfp_model_uri": first["model_uri"],
        "kfp_log": first["log_file"],
        "kfp_rerun_log": rerun["log_file"],
    }
    print_repetition(index, result, metric)
    return result


def print_repetition(index: int, rep: dict[str, Any], metric: str) -> None:
    print(
        f"rep {index}: plain {rep['plain_wall']:.1f} s | KFP first run {rep['kfp_first_wall']:.1f}"
        f" s | KFP cached rerun {rep['kfp_rerun_wall']:.1f} s | KFP cold (a fresh Python per "
        f"step) {rep['kfp_cold_wall']:.1f} s",
        flush=True,
    )
    print(
        f"  test {metric}: plain {rep['plain_metric']:.4f} ({rep['plain_model_uri']}) | KFP "
        f"{rep['kfp_metric']:.4f} ({rep['kfp_model_uri']}) | rerun {rep['kfp_rerun_metric']:.4f}"
        f" | cold {rep['kfp_cold_metric']:.4f}"
    )
    cached = ", ".join(rep["kfp_rerun_cached"]) or "none"
    verdict = "as expected" if rep["rerun_cache_ok"] else "NOT as expected"
    print(f"  rerun ran: {', '.join(rep['kfp_rerun_ran'])}; cached: {cached} ({verdict})")
    if rep["kfp_first_cached"]:
        print(f"  warning: the first run found cached steps: {rep['kfp_first_cached']}")


def step_table(reps: list[dict[str, Any]]) -> list[str]:
    """Median seconds per step, plain vs KFP, and what each run spent outside its steps."""
    lines = [
        f"  {'step':<18}{'plain s':>9}{'KFP s':>9}{'KFP-plain':>11}{'rerun s':>9}{'cold s':>9}"
    ]
    for step in STEPS:
        plain_s = common.median([r["plain_steps"][step] for r in reps])
        kfp_s = common.median([r["kfp_first_steps"][step] for r in reps])
        rerun_s = common.median([r["kfp_rerun_steps"][step] for r in reps])
        cold_s = common.median([r["kfp_cold_steps"][step] for r in reps])
        cached = all(step in r["kfp_rerun_cached"] for r in reps)
        rerun = "cached" if cached else f"{rerun_s:.1f}"
        lines.append(
            f"  {step:<18}{plain_s:>9.1f}{kfp_s:>9.1f}{kfp_s - plain_s:>+11.1f}{rerun:>9}"
            f"{cold_s:>9.1f}"
        )
    walls = {
        "plain": ("plain_wall", "plain_steps"),
        "KFP first": ("kfp_first_wall", "kfp_first_steps"),
        "KFP rerun": ("kfp_rerun_wall", "kfp_rerun_steps"),
        "KFP cold": ("kfp_cold_wall", "kfp_cold_steps"),
    }
    for name, (wall, steps) in walls.items():
        spent = common.median([outside(r[wall], r[steps]) for r in reps])
        lines.append(f"  outside steps, {name}: {spent:.1f} s (start-up, imports, orchestration)")
    return lines


def verdict(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    sign = "≤" if at_most else "≥"
    return f"target {sign} {target:g}x: {'met' if met else 'not met'}"


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    plain_wall = common.median([r["plain_wall"] for r in reps])
    first = common.median([r["kfp_first_wall"] for r in reps])
    rerun = common.median([r["kfp_rerun_wall"] for r in reps])
    cold = common.median([r["kfp_cold_wall"] for r in reps])
    ratio, speedup = first / plain_wall, first / rerun
    print("\nMedian seconds per step")
    print("\n".join(step_table(reps)))
    print()
    print(common.ratio_line("pipeline wall", first, plain_wall, "s", "plain process"))
    print(f"  KFP ÷ plain {ratio:.2f}x — {verdict(ratio, RATIO_TARGET, at_most=True)}")
    print(
        f"cached rerun: KFP first run {first:,.1f} s | identical rerun {rerun:,.1f} s | "
        f"speed-up {speedup:.1f}x — {verdict(speedup, SPEEDUP_TARGET, at_most=False)}"
    )
    print(
        f"warm start: KFP first run {first:,.1f} s | a fresh Python per step {cold:,.1f} s | "
        f"{cold / first:.2f}x (cold ÷ plain {cold / plain_wall:.2f}x)"
    )
    return {
        "plain_wall_median": plain_wall,
        "kfp_first_wall_median": first,
        "kfp_rerun_wall_median": rerun,
        "ratio_kfp_over_plain": ratio,
        "ratio_target": RATIO_TARGET,
        "ratio_target_met": ratio <= RATIO_TARGET,
        "rerun_speedup": speedup,
        "kfp_cold_wall_median": cold,
        "ratio_cold_over_warm": cold / first,
        "speedup_target": SPEEDUP_TARGET,
        "speedup_target_met": speedup >= SPEEDUP_TARGET,
        "rerun_cache_ok": all(r["rerun_cache_ok"] for r in reps),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.run_parser((__doc__ or "").splitlines()[0], DEFAULT_CONFIG, repeats=3)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a tiny run: the first {common.SMOKE_TRAIN_ROWS} SST-2 training and "
        f"{common.SMOKE_TEST_ROWS} dev rows, one repetition (its figures mean nothing)",
    )
    parser.add_argument("--plain", nargs=2, metavar=("CONFIG", "WORKDIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.plain:
        return plain(args.plain[0], Path(args.plain[1]).absolute(), args.overrides)
    from transferkit.config import load_config

    # Fail fast on a bad config, before any child starts.
    config = load_config(common.ROOT / args.config, args.overrides)
    metric = config.evaluation.primary_metric
    with common.work_dirs("transferkit-bench-pipeline-", args.keep) as root:
        if args.smoke:
            data = common.smoke_data(root / "smoke-sst2")
            args.repeats = 1
            args.overrides += [
                f"data.train_uri={data / 'train.tsv'}",
                f"data.test_uri={data / 'dev.tsv'}",
            ]
        print(f"{args.config} {' '.join(args.overrides)}: {args.repeats} repetitions in {root}")
        reps = [repetition(i + 1, args, root, metric) for i in range(args.repeats)]
        report = {
            "benchmark": "pipeline overhead: KFP local runner vs one plain process",
            "config": args.config,
            "overrides": args.overrides,
            "repetitions": reps,
            **summarise(reps),
            "machine": common.machine(smoke=args.smoke),
        }
    common.save(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
