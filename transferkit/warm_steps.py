"""Start the steps of a local run from a warm Python instead of a fresh one.

KFP's ``SubprocessRunner`` starts every step as ``sh`` → a new ``python -m
kfp.dsl.executor_main``, which imports torch, transformers, MLflow and pyarrow again: 1.5–3 s
per step on this CPU before any work, most of a small run's time (``bench/pipeline.py``). For
``transferkit run`` (``runtime.warm_start``, on by default) a helper process imports them once
and forks a child per step; the child runs KFP's executor on the same arguments, environment
and working directory as the subprocess would, with its output on a pipe that the runner
reads as KFP's own runner reads the subprocess's. A step is still a process of its own (its
memory, its exit status, SIGTERM to stop it, ``processes.stop_tree`` finds it below the
runner), and what it computes is unchanged.

The helper starts with the first step that KFP did not serve from its cache and that not every
run runs (``ALWAYS_RUN``): a cached rerun runs only those, cold, and starts no helper. That
step waits for the helper's imports (about as long as its own cold imports); a step whose
command is not KFP's lightweight-component command, or that comes after the helper is gone or
when it was not ready within ``READY_TIMEOUT``, runs as KFP runs it (a fresh Python).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# What a step imports; the helper imports them once (a missing one is skipped).
WARM_MODULES = (
    "torch",
    "transformers",
    "safetensors.torch",
    "pyarrow.parquet",
    "pandas",
    "sklearn.linear_model",
    "mlflow",
    "mlflow.pyfunc",
    "kfp.dsl.executor_main",
    "transferkit.data",
    "transferkit.backbones",
    "transferkit.features",
    "transferkit.training",
    "transferkit.evaluation",
    "transferkit.registry",
    "transferkit.tracking",
)
_HEADER = struct.Struct("!I")
# Seconds the first step waits for the helper's imports before it runs as KFP runs it.
READY_TIMEOUT = 120.0
_COMMAND = re.compile(r"_KFP_RUNTIME=true \S+ -m kfp\.dsl\.executor_main\s")


# Steps that run in every run, cached or not (they open and close the MLflow run, and register):
# they never start the helper, since a cached rerun runs only them, and its start-up (importing
# everything, ~5 s here) would cost more than their own cold imports. They use it once it runs.
ALWAYS_RUN = frozenset({"open_run", "register_model", "close_run"})


def _function(args: list[str]) -> str | None:
    """The step's function, from KFP's executor arguments."""
    if "--function_to_execute" not in args[:-1]:
        return None
    return args[args.index("--function_to_execute") + 1]


def _always_runs(args: list[str]) -> bool:
    return _function(args) in ALWAYS_RUN


def step_request(full_command: list[str]) -> dict[str, Any] | None:
    """The component source and executor arguments of KFP's lightweight-component command
    (``sh -ec SCRIPT SOURCE ARGS…``), or None for any other command."""
    if len(full_command) < 4 or full_command[:2] != ["sh", "-ec"]:
        return None
    script = full_command[2]
    if not _COMMAND.search(script) or '"$program_path/ephemeral_component.py"' not in script:
        return None
    return {"source": full_command[3], "args": full_command[4:]}


class WarmSteps:
    """The helper process of one run and the stand-in for KFP's ``run_local_subprocess``."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="transferkit-warm-"))
        self.address = str(self.folder / "steps.sock")
        self.process: subprocess.Popen[bytes] | None = None
        self.warm = 0  # steps started warm, and all steps: for the run's log
        self.steps = 0

    def start(self) -> None:
        """Start the helper (once)."""
        if self.process is not None:
            return
        with open(self.folder / "helper.log", "wb") as log:  # why it never got ready
            self.process = subprocess.Popen(
                [sys.executable, "-m", "transferkit.warm_steps", self.address, str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def ready(self) -> bool:
        return (
            self.process is not None
            and self.process.poll() is None
            and os.path.exists(self.address)
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Wait for the helper's imports (a step started cold meanwhile would import the same
        modules beside it, on the same cores); False if it ended or is not ready in time."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process is None or self.process.poll() is not None:
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def run(
        self, original: Callable[..., int], full_command: list[str], env_vars: dict | None = None
    ) -> int:
        """KFP's ``run_local_subprocess(full_command, env_vars)``: the step's exit status, its
        output printed line by line."""
        self.steps += 1
        request = step_request(full_command)
        if request is not None and self.process is None and not _always_runs(request["args"]):
            self.start()
        if request is None or not self.wait_ready():
            return original(full_command=full_command, env_vars=env_vars)
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(self.address)
        except OSError:  # gone since ready() looked
            connection.close()
            return original(full_command=full_command, env_vars=env_vars)
        request.update(env={**os.environ, **(env_vars or {})}, cwd=os.getcwd())
        payload = json.dumps(request).encode()
        reader, writer = os.pipe()
        with connection:
            try:
                socket.send_fds(connection, [_HEADER.pack(len(payload))], [writer])
                connection.sendall(payload)
            finally:
                os.close(writer)
            self.warm += 1
            with open(reader, encoding="utf-8", errors="replace") as output:
                for line in output:
                    print(line, end="")
            print("\n")  # as KFP's runner separates a step's output
            answer = b""
            while chunk := connection.recv(64):
                answer += chunk
        # No exit status: the step was killed (SIGKILL) before it could say.
        return int(answer) if answer.strip().lstrip(b"-").isdigit() else -signal.SIGKILL

    def report(self) -> str:
        """One line for the run's log: how many steps started warm, or why none could."""
        line = f"warm start: {self.warm} of {self.steps} steps forked from the helper"
        if self.process is None:
            line += " (not started: no cacheable step ran)"
        elif self.process.poll() is not None:
            log = (self.folder / "helper.log").read_text(errors="replace").strip()
            last = log.splitlines()[-1] if log else "no output"
            line += f"; the helper ended with status {self.process.returncode}: {last}"
        return line

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def started() -> Iterator[WarmSteps]:
    """KFP's local runner starts its steps from a warm helper while inside."""
    from kfp.local import subprocess_task_handler as handler

    warm = WarmSteps()
    original = handler.run_local_subprocess

    def run_local_subprocess(full_command: list[str], env_vars: dict | None = None) -> int:
        return warm.run(original, full_command, env_vars)

    handler.run_local_subprocess = run_local_subprocess
    try:
        yield warm
    finally:
        handler.run_local_subprocess = original
        print(warm.report())  # into the run's log (stdout is redirected there)
        warm.close()


# The helper process ------------------------------------------------------------------------


def _receive(connection: socket.socket) -> tuple[dict[str, Any], int]:
    head, fds, _, _ = socket.recv_fds(connection, _HEADER.size, 1)
    while len(head) < _HEADER.size:
        head += connection.recv(_HEADER.size - len(head))
    (size,) = _HEADER.unpack(head)
    body = bytearray()
    while len(body) < size:
        chunk = connection.recv(min(size - len(body), 1 << 20))
        if not chunk:
            raise EOFError("the runner closed the connection mid-request")
        body += chunk
    if len(fds) != 1:
        raise EOFError("no output pipe came with the request")
    return json.loads(body), fds[0]


def _name_process(args: list[str]) -> None:
    """The step's function as the process name (``ps``, ``top``, ``/proc/PID/comm``): its
    command line is the helper's (Linux; elsewhere it keeps the helper's name)."""
    function = _function(args)
    if function is None:
        return
    name = function.encode()[:15]
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def _step(request: dict[str, Any], output: int, connection: socket.socket) -> None:
    """In the forked child: become the step's process, run KFP's executor, report, exit."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # its own subprocesses are waited for
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _name_process(request["args"])
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ["_KFP_RUNTIME"] = "true"
    os.chdir(request["cwd"])
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed()  # a fresh process's unseeded state, not the helper's
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    folder = tempfile.mkdtemp()
    module = Path(folder) / "ephemeral_component.py"
    module.write_text(request["source"], encoding="utf-8")
    sys.argv = ["executor_main", "--component_module_path", str(module), *request["args"]]
    code = 0
    try:
        import runpy

        runpy.run_module("kfp.dsl.executor_main", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException as error:  # as Python reports an uncaught error, and its status
        sys.excepthook(type(error), error, error.__traceback__)
        code = 130 if isinstance(error, KeyboardInterrupt) else 1
    import atexit

    atexit._run_exitfuncs()
    shutil.rmtree(folder, ignore_errors=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):
        connection.sendall(str(code).encode())
    os._exit(code)


def serve(address: str, runner: int) -> None:
    """The helper: import what steps import, then fork a child per request until the runner
    that started it (pid ``runner``) is gone or stops it."""
    import gc
    import importlib

    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    gc.collect()
    gc.freeze()  # what was imported stays shared with every child, not copied on write
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = f"{address}.{os.getpid()}"
    listener.bind(partial)
    listener.listen(16)
    os.rename(partial, address)  # ready: the runner sees the socket only now
    listener.settimeout(1.0)
    while os.getppid() == runner:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        connection.settimeout(None)
        with connection:
            try:
                request, output = _receive(connection)
            except (OSError, EOFError, ValueError):
                continue
            if os.fork() == 0:
                try:
                    listener.close()
                    _step(request, output, connection)
                finally:
                    os._exit(1)  # never back into the helper's loop
            os.close(output)
    listener.close()
    # The runner is gone without closing it (killed): nothing else will remove its folder.
    shutil.rmtree(Path(address).parent, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
