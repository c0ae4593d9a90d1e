"""Logging of the entry points (the CLI, every component, a training node): plain lines on
stderr in one stable format, which ``transferkit run`` recognises in a step's output."""

from __future__ import annotations

import atexit
import gc
import logging
import sys

from transferkit import termination

LOG_FORMAT = "transferkit %(levelname)s %(name)s | %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Log transferkit's records as plain lines on stderr (entry points only: CLI, components).

    The format is stable: ``transferkit run`` recognises step log lines by it. Being every
    entry point's first call, it also makes SIGTERM end the process by ``errors.Terminated`` (see
    ``termination.exit_on_sigterm``) and, in a step's pod on a cluster, puts an uncaught error on
    the pipeline run's MLflow run (``tracking.report_failures``).
    """
    from transferkit import tracking

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("transferkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    _quick_exit()
    termination.exit_on_sigterm()
    tracking.report_failures()


_exit_freeze_registered = False


def _quick_exit() -> None:
    """Skip the interpreter's last garbage collection when this process ends.

    A step that loaded torch and a model spends 1–1.5 s at exit collecting millions of
    objects that the OS frees at once anyway; each KFP step is a process of its own, so that
    was paid at every step (bench/pipeline.py). Registered first, the freeze runs after every
    other exit handler (MLflow's included), so nothing that flushes at exit is skipped.
    """
    global _exit_freeze_registered
    if not _exit_freeze_registered:
        atexit.register(gc.freeze)
        _exit_freeze_registered = True
