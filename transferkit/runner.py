"""Run the pipeline on this machine with KFP's local runner, and summarise the run.

The pipeline runs exactly as compiled for a cluster: every step is a KFP component executed
by ``kfp.local.SubprocessRunner(use_venv=False)`` in a subprocess of this Python, with KFP's
local caching. Everything the steps print goes to a log file; the terminal gets one line per
step and the summary. SIGINT or SIGTERM stops every process the run started (the step, and
whatever the step started) before ``run_local`` raises ``RunInterruptedError``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel

from transferkit import processes, progress, storage, tracking
from transferkit.backbones import hub
from transferkit.config import PipelineConfig
from transferkit.errors import ConfigError, RunInterruptedError, TransferkitError
from transferkit.step_inputs import SINGLE_STEPS, step_arguments

log = logging.getLogger(__name__)

# open_run and close_run open and close the pipeline run's MLflow run (transferkit.tracking).
STEPS = ("open_run", *SINGLE_STEPS, "close_run")
SWEEP_STEPS = (
    "open_run",
    "ingest_data",
    "fetch_backbone",
    "extract_features",
    "plan_sweep",
    "train",
    "evaluate",
    "compare_strategies",
    "register_model",
    "close_run",
)
# The steps that open and close the run's MLflow run: never cached, never announced so.
_BOOKKEEPING = frozenset({"open_run", "close_run"})
BRANCH_STEPS = frozenset({"train", "evaluate"})  # a sweep's ParallelFor (pipelines/sweep.py)
STEP_PROGRESS_SECONDS = 2.0  # between two progress lines of a step (TRANSFERKIT_PROGRESS_SECONDS)
# Depth of each step in the DAG: a step starts only after every step of a lower depth ended.
DEPTH = {step: depth for depth, step in enumerate(STEPS)}
SWEEP_DEPTH = {step: depth for depth, step in enumerate(SWEEP_STEPS)}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([\w-]+)'")
_DONE = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
_STEP_LOG = re.compile(r"^\s*transferkit (INFO|WARNING|ERROR) ([\w.]+) \| (.*)$")
_ERROR = re.compile(r"^\s*transferkit\.errors\.\w+: (.*)$")
_EXCEPTION = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$")
# An output artifact in KFP's "Task '…' outputs:" lines.
_OUTPUT_URI = re.compile(r"^\s*uri='([^']+)',?$")


class RunFailedError(TransferkitError):
    """A pipeline step failed; the message carries the step's own one-line cause."""


class _Stop(BaseException):
    """Raised by the signal handler to leave KFP's runner (no ``except Exception`` in it
    may swallow it)."""


class RunSummary(BaseModel):
    """What ``transferkit run --summary FILE`` writes."""

    metrics: dict[str, float]
    scores: dict[str, Any]
    model_uri: str
    champion_uri: str
    tracking_uri: str
    champion: bool
    champion_reason: str
    version: str
    step_seconds: dict[str, float]
    cached_steps: list[str]
    wall_seconds: float
    log_file: str
    run_dir: str
    sweep: dict[str, Any] | None = None
    modality: str = "text"
    primary_metric: str = "accuracy"
    sweep_run_id: str | None = None


@dataclass
class _Events:
    """Step events parsed from the local runner's output as it streams."""

    on_line: Callable[[str], None]
    depth: dict[str, int] = field(default_factory=lambda: DEPTH)
    started: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    failed: str | None = None
    task_lines: dict[str, list[str]] = field(default_factory=dict)
    current: str | None = None
    announced: set[str] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    failure: str | None = None
    running: list[str] = field(default_factory=list)
    muted: bool = False
    outputs: dict[str, list[str]] = field(default_factory=dict)
    branches: int = 0  # a sweep's branches, each running BRANCH_STEPS once

    def feed(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        if self.muted:  # interrupted: what the stopped steps print is for the log only
            return
        if (match := _START.search(line)) and match.group(1).replace("-", "_") in self.depth:
            self.current = step = match.group(1).replace("-", "_")
            self.running.append(step)
            self.announce_cached(before=step)
            # A step inside a ParallelFor starts once per branch: a start after a success is
            # the next branch, a start after a failure is a retry.
            attempt = self.attempts[step] = self.attempts.get(step, 0) + 1
            self.started[step] = time.perf_counter()
            self.task_lines[step] = []
            branch = self.runs.get(step, 0) + 1
            if attempt > 1:
                self.on_line(f"retry {step} {attempt}")
            else:
                self.on_line(f"start {self.branch(step, branch)}")
        elif (match := _DONE.search(line)) and match.group(1).replace("-", "_") in self.depth:
            step = match.group(1).replace("-", "_")
            if step in self.running:
                self.running.remove(step)
            took = time.perf_counter() - self.started.get(step, time.perf_counter())
            ok = match.group(2) == "SUCCESS"
            if not ok:
                # The first failure is the run's cause: close_run, the exit step, runs after
                # it and may fail too (an MLflow server that is down fails both).
                if self.failed is None or self.failed == step:
                    self.failed = step
                    self.failure = self._cause(self.task_lines.get(step, []))
                self.seconds[step] = took
            else:
                self.attempts[step] = 0
                self.runs[step] = self.runs.get(step, 0) + 1
                # Branch steps add up: the summary gives the time spent in each kind of step.
                self.seconds[step] = self.seconds.get(step, 0.0) + took
            runs = self.runs.get(step, 0)
            shown = self.branch(step, runs if ok else runs + 1)
            self.on_line(f"{'done' if ok else 'failed'} {shown} {took:.1f}")
        elif self.current is not None:
            self.task_lines[self.current].append(line)
            if uri := _OUTPUT_URI.match(line):
                self.outputs.setdefault(self.current, []).append(uri.group(1))
            if step_log := _STEP_LOG.match(line):
                level, name, message = step_log.groups()
                if name == "transferkit.progress" and level == "INFO":
                    self.on_line(f"progress {self.current} {message}")
                else:
                    self.on_line(f"log {level} {name} {message}")

    def branch(self, step: str, number: int) -> str:
        """A step as the screen names it: ``train #2/6`` in a sweep's branches."""
        if self.branches and step in BRANCH_STEPS:
            return f"{step} #{number}/{self.branches}"
        return step if number <= 1 else f"{step} #{number}"

    def announce_cached(self, before: str | None = None) -> None:
        """Report steps that never started as cached (KFP's local runner does not log hits).

        When a step starts, every shallower step that did not start was served from the
        cache; at the end of a successful run, so were all the others.
        """
        if self.failed is not None:  # the steps after a failure did not run: none was cached
            return
        depth = self.depth.get(before, len(self.depth)) if before else len(self.depth)
        for step in self.depth:
            if self.depth[step] >= depth:
                return
            if step in _BOOKKEEPING:
                continue
            if step not in self.started and step not in self.announced:
                self.announced.add(step)
                self.on_line(f"cached {step}")

    def where(self) -> str:
        """Where the run is: in which step(s), or between which."""
        if self.running:
            names = sorted(set(self.running))
            return f"in step{'s' if len(names) > 1 else ''} {', '.join(names)}"
        if self.current is not None:
            return f"after step {self.current}"
        return "before the first step"

    def cause(self) -> str:
        """The last failed attempt's own one-line error, or its last exception line."""
        return self.failure or "see the log for the traceback"

    @staticmethod
    def _cause(lines: list[str]) -> str | None:
        for pattern in (_ERROR, _EXCEPTION):
            for line in reversed(lines):
                if match := pattern.match(line):
                    return (
                        match.group(match.lastindex or 1)
                        if pattern is _ERROR
                        else (f"{match.group(1)}: {match.group(2)}")
                    )
        return None


class _LineTee(io.TextIOBase):
    """A text stream that writes everything to a file and hands complete lines to a parser."""

    def __init__(self, sink: TextIO, events: _Events) -> None:
        self._sink = sink
        self._events = events
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._sink.write(text)
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._events.feed(line)
        return len(text)

    def flush(self) -> None:
        self._sink.flush()


def source_stamps(config: PipelineConfig) -> tuple[str, str]:
    """Content stamps of the data sources and of the backbone source(s)."""
    from transferkit.data.ingest import data_stamp

    stamps = ",".join(
        hub.source_stamp(uri) if hub.is_hub_uri(uri) else storage.stamp(uri, config.storage)
        for uri in _backbones(config)
    )
    return data_stamp(config), stamps


def _backbones(config: PipelineConfig) -> list[str]:
    if config.backbone_selection is not None:
        return [c.uri for c in config.backbone_selection.candidates]
    return [config.backbone.uri]


def _child_environment(config: PipelineConfig) -> None:
    # Steps run in subprocesses that inherit this environment: offline model loading (unless
    # fetch_backbone downloads from the Hub), no tokenizer thread pools fighting torch's, no
    # download progress bars in logs.
    offline = "0" if any(hub.is_hub_uri(uri) for uri in _backbones(config)) else "1"
    for key, value in {
        "HF_HUB_OFFLINE": offline,
        "TRANSFORMERS_OFFLINE": offline,
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PYTHONUNBUFFERED": "1",
        # A progress line every 2 s: the step's line on the screen shows the latest.
        progress.INTERVAL_ENV: str(STEP_PROGRESS_SECONDS),
    }.items():
        os.environ.setdefault(key, value)


def _step_runner(
    config: PipelineConfig, stamp: str
) -> tuple[Any, contextlib.AbstractContextManager[Any]]:
    """KFP's local runner of the steps, and what the run must hold around it.

    ``runtime.runner: subprocess``: a subprocess of this Python, forked from a warm helper
    with ``runtime.warm_start`` (``transferkit.warm_steps``). ``docker``: a container of
    the transferkit image through the Docker API at DOCKER_HOST (Docker's, or podman's
    ``podman system service``), checked first: the engine answers, and the image is there
    and holds this code (``transferkit.containers_local``).
    """
    from kfp import local

    if config.runtime.runner == "subprocess":
        from transferkit import warm_steps

        around: contextlib.AbstractContextManager[Any] = (
            warm_steps.started() if config.runtime.warm_start else contextlib.nullcontext()
        )
        return local.SubprocessRunner(use_venv=False), around
    from transferkit import containers_local

    runner = containers_local.docker_runner(config, labels={"dev.transferkit.run": stamp})
    return runner, containers_local.exit_status_kept()


@dataclass
class _Interrupt:
    """The signal that interrupted a run, once one has."""

    signum: int | None = None
    where: str = ""
    stopped: int = 0
    hurry: bool = False
    over: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def _stop_on_signals(events: _Events) -> Iterator[_Interrupt]:
    """While the pipeline runs, SIGINT and SIGTERM stop every process below this one.

    The handler freezes and stops the process tree (``processes.stop_tree``), then raises
    ``_Stop`` in the main thread so that KFP starts no further step. Steps that KFP's worker
    threads start while it unwinds (queued branches of a sweep) are stopped as they appear,
    until the pipeline call has returned. A second signal skips the grace period. This
    process stays in its process group: Ctrl-C on a terminal still reaches it.
    """
    interrupt = _Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt  # signal handlers belong to the main thread
        return

    def reap() -> None:
        while not interrupt.over.wait(0.1):
            interrupt.stopped += len(processes.stop_tree(grace=1.0))

    def handler(signum: int, frame: Any) -> None:
        if interrupt.signum is not None:
            interrupt.hurry = True
            return
        interrupt.signum, interrupt.where = signum, events.where()
        events.muted = True
        stopped = processes.stop_tree(hurry=lambda: interrupt.hurry)
        interrupt.stopped = len(stopped)
        threading.Thread(target=reap, name="transferkit-reaper", daemon=True).start()
        raise _Stop

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupt
    finally:
        interrupt.over.set()
        for signum, before in previous.items():
            signal.signal(signum, before)


def run_local(config: PipelineConfig, on_event: Callable[[str], None] | None = None) -> RunSummary:
    """Run the whole DAG locally and return its summary.

    Args:
        config: a resolved configuration (absolute paths, see ``PipelineConfig.resolved``).
        on_event: called with short progress strings ('start train', 'done train 12.3', ...).

    Raises:
        RunFailedError: a step failed (the message names the step and its cause, and the log).
        RunInterruptedError: SIGINT or SIGTERM; every process the run started was stopped.
        TransferkitError: an input could not be read before the run started.
    """
    from transferkit.backbones.support import check_local

    check_local(config)  # refuse a family/strategy mismatch before any step starts
    from kfp import local

    import transferkit.pipelines as pipelines

    if config.training.nodes > 1:
        raise ConfigError(
            f"training.nodes {config.training.nodes}: several nodes train on a cluster (a "
            "Kubeflow Trainer TrainJob, see transferkit submit); locally set training.nodes: 1 "
            "and training.processes for several processes"
        )

    sweep = config.sweep is not None
    # Only the DAG this run needs is built (the package builds each when first asked for).
    pipeline = pipelines.strategy_sweep if sweep else pipelines.transfer_learning
    steps = SWEEP_STEPS if sweep else STEPS
    started, began = time.perf_counter(), time.time()
    work_dir = Path(config.runtime.work_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    log_file = work_dir / "logs" / f"run-{stamp}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    data_stamp, backbone_stamp = source_stamps(config)
    _child_environment(config)
    os.environ[tracking.LOCAL_RUN_ENV] = stamp  # open_run tags the MLflow run with it
    runner, around_steps = _step_runner(config, stamp)
    local.init(
        runner=runner,
        pipeline_root=config.pipeline_root,
        enable_caching=config.runtime.caching,
        cache_root=str(work_dir / "kfp-cache"),
        raise_on_error=True,
    )
    events = _Events(on_line=on_event or (lambda _: None), depth=SWEEP_DEPTH if sweep else DEPTH)
    if sweep:
        from transferkit.sweep import plan

        events.branches = len(plan(config))
    with open(log_file, "w", encoding="utf-8") as sink, _stop_on_signals(events) as interrupt:
        try:
            tee = _LineTee(sink, events)
            with (
                contextlib.redirect_stdout(tee),
                contextlib.redirect_stderr(tee),
                around_steps,
            ):
                pipeline(
                    **step_arguments(config),
                    data_stamp=data_stamp,
                    backbone_stamp=backbone_stamp,
                )
        except (_Stop, RuntimeError) as error:
            if interrupt.signum is not None:
                # Whatever KFP's threads started last is gone too. Steps write their outputs
                # atomically and KFP caches only a step that succeeded: nothing of a stopped
                # step is served to a later run.
                interrupt.stopped += len(processes.stop_tree(grace=1.0))
                _discard_stopped(Path(config.pipeline_root), began, events.running)
                if config.runtime.runner == "docker":
                    from transferkit.containers_local import stop_containers

                    interrupt.stopped += stop_containers(stamp)
                name = signal.Signals(interrupt.signum).name
                raise RunInterruptedError(
                    f"{name} {interrupt.where}; stopped {interrupt.stopped} process"
                    f"{'es' if interrupt.stopped != 1 else ''} it had started, kept nothing of "
                    f"the unfinished steps (log: {log_file})",
                    interrupt.signum,
                ) from None
            if isinstance(error, _Stop):
                raise
            step = events.failed or "pipeline"
            _record_failure(config, stamp, events, step)
            raise RunFailedError(f"{step} failed: {events.cause()} (log: {log_file})") from None
    events.announce_cached()
    registration_path = _registration(events, log_file)
    result = storage.read_json(registration_path)
    comparison = None
    if sweep:
        # register_model's outputs sit beside compare_strategies' under the run folder.
        found = sorted(registration_path.parents[1].glob("compare-strategies/evaluation/sweep"))
        if found:
            comparison = storage.read_json(found[0] / "comparison.json")
            comparison["report"] = str(found[0] / "report.html")
    return RunSummary(
        modality=config.data.modality,
        primary_metric=config.evaluation.primary_metric,
        metrics=result["metrics"],
        scores=result["scores"],
        model_uri=result["model_uri"],
        champion_uri=result["champion_uri"],
        tracking_uri=result["tracking_uri"],
        champion=result["champion"],
        champion_reason=result["reason"],
        version=result["version"],
        step_seconds={s: round(events.seconds.get(s, 0.0), 2) for s in steps},
        # KFP's local runner does not log cache hits: a step of a successful run that never
        # started was served from the cache.
        cached_steps=[s for s in steps if s not in events.started],
        wall_seconds=round(time.perf_counter() - started, 2),
        log_file=str(log_file),
        run_dir=str(registration_path.parents[1]),
        sweep=comparison,
        sweep_run_id=result.get("sweep_run_id"),
    )


def _discard_stopped(pipeline_root: Path, began: float, running: list[str]) -> None:
    """The output folders of the steps a signal stopped, in this run's folder of the pipeline
    root. KFP never recorded them, so nothing would serve them, but a step that finished its
    (atomic) writes just as the signal came would leave a complete one behind."""
    import shutil

    if not running or not pipeline_root.is_dir():
        return
    for run_dir in pipeline_root.iterdir():
        if run_dir.is_dir() and run_dir.stat().st_mtime >= began - 1:
            for step in running:
                shutil.rmtree(run_dir / step.replace("_", "-"), ignore_errors=True)


def _record_failure(config: PipelineConfig, stamp: str, events: _Events, step: str) -> None:
    """The failed step's own one-line error on the run's MLflow run, once open_run opened it
    (close_run marked it FAILED with KFP's message, which names no cause)."""
    if not events.runs.get("open_run"):
        return
    try:
        tracking.record_failure(config, stamp, step, f"{step} failed: {events.cause()}")
    except Exception as exc:  # the step's error matters more
        log.warning("could not record the failure on the MLflow run: %s", exc)


def _registration(events: _Events, log_file: Path) -> Path:
    """register_model's output: the pipeline returns nothing (its steps run inside the exit
    handler, from which KFP returns no output), so it is read from KFP's log of the step."""
    for uri in events.outputs.get("register_model", []):
        if uri.endswith("/registration"):
            return Path(uri)
    raise RunFailedError(f"register_model reported no registration output (log: {log_file})")


def write_summary(summary: RunSummary, path: Path) -> None:
    """Write the run summary JSON (atomically)."""
    storage.write_json(path, json.loads(summary.model_dump_json()), sort_keys=False)
