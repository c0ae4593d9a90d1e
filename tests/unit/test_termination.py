"""SIGTERM as an exception: what a stopped step needs to release what it holds."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from transferkit.errors import Terminated
from transferkit.termination import sigterm_raises


def terminated_while_holding(released: list[str]) -> None:
    """A step holding a lock when SIGTERM arrives, and again while it unwinds."""
    with sigterm_raises("the registration of 'm'"):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # a bytecode boundary: the handler has run
            raise AssertionError("SIGTERM did not interrupt")
        finally:
            # A second SIGTERM while unwinding is ignored, the clean-up goes on.
            os.kill(os.getpid(), signal.SIGTERM)
            released.append("lock")


def test_sigterm_raises_terminated_runs_finally_and_restores_the_handler() -> None:
    def previous(signum: int, frame: object) -> None:
        raise AssertionError("the previous handler ran inside")

    before = signal.signal(signal.SIGTERM, previous)
    released: list[str] = []
    try:
        with pytest.raises(Terminated) as caught:
            terminated_while_holding(released)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, before)
    assert released == ["lock"]
    assert str(caught.value) == "the registration of 'm' was terminated (SIGTERM)"
    # Not an Exception, so no `except Exception` swallows it; uncaught, the process exits
    # with 128 + SIGTERM, as a terminated one does.
    assert not isinstance(caught.value, Exception)
    assert caught.value.code == 143


def test_outside_the_main_thread_nothing_changes() -> None:
    seen = []

    def worker() -> None:
        with sigterm_raises("work"):
            seen.append(signal.getsignal(signal.SIGTERM))

    handler = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [handler]
