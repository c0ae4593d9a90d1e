"""SIGTERM / SIGINT of `transferkit run`: every process it started stops, one line, 143 / 130."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from transferkit import processes

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["ingest_data", "fetch_backbone", "extract_features", "train", "evaluate", "register_model"]

pytestmark = pytest.mark.slow


def small_config(
    tmp_path: Path, sst2_small: dict[str, Path], tiny_backbone: Path, warm_start: bool = True
) -> Path:
    """300 real rows, the tiny random BERT, fine-tuned for far longer than the test waits."""
    config = {
        "data": {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "text_column": "sentence",
            "max_rows": 300,
        },
        "backbone": {"uri": str(tiny_backbone), "max_length": 32},
        "strategy": {"name": "full_finetune"},
        "training": {"epochs": 500, "batch_size": 16, "precision": "fp32"},
        "registry": {"model_name": "interrupted"},
        "runtime": {"work_dir": str(tmp_path / "work"), "warm_start": warm_start},
    }
    path = tmp_path / "interrupt.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def step_of(proc: processes.Proc) -> str | None:
    """The KFP step a step's Python runs, if it is one: a fresh ``python -m
    kfp.dsl.executor_main`` names it on its command line (its ``sh`` parent too, but that is
    not the step yet); one forked from the warm helper (transferkit.warm_steps) in its name."""
    try:
        args = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        name = Path(f"/proc/{proc.pid}/comm").read_text().strip()
    except OSError:
        return None
    if b"kfp.dsl.executor_main" in args and b"--function_to_execute" in args:
        return args[args.index(b"--function_to_execute") + 1].decode()
    return name if name in STEPS else None


def forked(proc: processes.Proc) -> bool:
    """Whether a step's process was forked from the warm helper (its command line)."""
    try:
        return b"transferkit.warm_steps" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize(
    ("signum", "target", "wait_for", "whole_group", "warm"),
    [
        # SIGTERM to the run alone (kill PID, a supervisor): mid-training, the step forked
        # from the warm helper (the default), and as a fresh Python (warm_start: false).
        (signal.SIGTERM, "train", "step 0: validation", False, True),
        (signal.SIGTERM, "train", "step 0: validation", False, False),
        # SIGINT to the run alone (kill -INT PID): the step does not receive it.
        (signal.SIGINT, "fetch_backbone", None, False, None),
        # Ctrl-C on a terminal: SIGINT to the whole foreground process group.
        (signal.SIGINT, "ingest_data", None, True, None),
    ],
    ids=["sigterm-in-train", "sigterm-in-a-cold-train", "sigint-in-fetch", "ctrl-c-in-ingest"],
)
def test_an_interrupted_run_stops_every_process_it_started(
    tmp_path: Path,
    sst2_small: dict[str, Path],
    tiny_backbone: Path,
    signum: signal.Signals,
    target: str,
    wait_for: str | None,
    whole_group: bool,
    warm: bool | None,
) -> None:
    """``warm``: whether the step must have been forked from the warm helper (None: either,
    as the helper's imports and the first steps race)."""
    config = small_config(tmp_path, sst2_small, tiny_backbone, warm is not False)
    script = Path(sys.executable).with_name("transferkit")
    run = subprocess.Popen(
        [str(script), "run", str(config), "--verbose"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Its own group, as a terminal gives a command: the test can signal the group.
        start_new_session=True,
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(run.stderr or []), daemon=True)
    reader.start()
    seen: dict[int, processes.Proc] = {}
    named: dict[int, str | None] = {}  # the step each process ran, read while it lived
    was_forked: dict[int, bool] = {}
    try:
        deadline = time.monotonic() + 600
        signalled = False
        while run.poll() is None and time.monotonic() < deadline:
            for proc in processes.descendants(run.pid):
                seen[proc.pid] = proc
                if named.get(proc.pid) is None:
                    named[proc.pid] = step_of(proc)
                    was_forked[proc.pid] = forked(proc)
            running = [named[p.pid] for p in seen.values() if processes.alive(p)]
            # The step's Python runs (below KFP's shell, or forked from the warm helper):
            # every process below the run must stop, not only its children.
            if (
                not signalled
                and target in running
                and (wait_for is None or wait_for in "".join(err))
            ):
                if whole_group:
                    os.killpg(run.pid, signum)
                else:
                    run.send_signal(signum)
                signalled = True
            time.sleep(0.05)
        assert signalled, "".join(err)[-3000:]
        step = next(p for p in seen.values() if named[p.pid] == target)
        if warm is not None:
            assert was_forked[step.pid] is warm
        assert run.wait(timeout=60) == 128 + signum, "".join(err)[-3000:]
        reader.join(timeout=10)
        # The run waits for its processes: none is left once it has ended.
        left = [p for p in seen.values() if processes.alive(p)]
        assert left == [], [(p.pid, named[p.pid]) for p in left]
        last = "".join(err).strip().splitlines()[-1]
        name = signal.Signals(signum).name
        assert re.match(
            rf"interrupted: {name} in step {target}; stopped \d+ process(es)? it had started, "
            r"kept nothing of the unfinished steps \(log: .*\.log\)$",
            last,
        ), last
        assert "Traceback" not in "".join(err)
        work = tmp_path / "work"
        # Nothing half-written is left, and nothing of the stopped step can be served later:
        # its output folder does not exist and KFP cached only the steps before it.
        assert list(work.rglob("*.tmp")) == []
        artifact = {"ingest_data": "dataset", "fetch_backbone": "backbone", "train": "model"}
        assert list(work.glob(f"pipeline-root/*/*/{artifact[target]}")) == []
        assert len(list(work.glob("kfp-cache/*.json"))) == STEPS.index(target)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        for proc in seen.values():  # what a failing run left behind
            if processes.alive(proc):
                os.kill(proc.pid, signal.SIGKILL)
