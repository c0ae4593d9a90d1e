"""SIGTERM as an exception, so that a stopped step releases what it holds.

Kubernetes, docker and systemd stop a process with SIGTERM (then SIGKILL after a grace
period); Python's default is to die on the spot, running no ``finally`` block. Inside
``sigterm_raises`` the signal raises ``errors.Terminated`` instead. SIGINT needs nothing: it
already raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from transferkit.errors import Terminated

log = logging.getLogger(__name__)


def _raiser(what: str) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler raising ``Terminated`` once; a second SIGTERM while the first
    unwinds is logged and ignored: the clean-up it would cut short is already under way."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:
            log.warning("SIGTERM again during %s: already stopping, cleaning up", what)
            return
        received.append(signum)
        raise Terminated(f"{what} was terminated (SIGTERM)")

    return handler


def exit_on_sigterm() -> None:
    """For the whole process: SIGTERM raises ``Terminated`` (exit status 143) instead of
    ending the process on the spot.

    Every entry point calls it first (``cli.configure_logging``): ``transferkit run`` stops an
    interrupted step with SIGTERM and a cluster stops a pod with it, and unwinding runs the
    ``finally`` blocks, so ``storage.atomic_dir`` removes its half-written folder. SIGKILL
    follows if that takes too long. A handler someone else installed is left alone, and
    outside the main thread (where Python cannot install handlers) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raiser("this step"))


@contextlib.contextmanager
def sigterm_raises(what: str) -> Iterator[None]:
    """Raise ``Terminated`` in the main thread when SIGTERM arrives inside; the previous
    handler is restored after.

    A second SIGTERM while the first unwinds is logged and ignored. Outside the main thread,
    where Python cannot install handlers (and signals are not delivered), it changes nothing.

    Args:
        what: the work being done, named in the exception's message.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raiser(what))
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be put back; the default.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
