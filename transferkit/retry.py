"""Run a step's work again after a transient failure, and only then.

KFP's retry policy (and Argo's under it) runs a failed step again whatever the cause: bad
input was read three times and reported half a minute late. The steps that talk to object
storage or MLflow call their core function through ``retry_transient`` instead, inside the
step's own process: an error marked transient where it was raised (a lost connection, a
timeout, S3 5xx or "slow down", MLflow unreachable or answering 5xx) is retried with
bounded exponential backoff; any other error — bad config, data or backbone, a missing
object, refused credentials, a bug — propagates at once, on the first attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from transferkit.errors import TransferkitError

log = logging.getLogger(__name__)

T = TypeVar("T")

# The whole work is tried at most this many times, waiting 5 s, then 10 s (capped at 60 s).
ATTEMPTS = 3
FIRST_DELAY = 5.0
BACKOFF = 2.0
MAX_DELAY = 60.0


def is_transient(error: BaseException) -> bool:
    """Whether running the same work again may succeed: a transferkit error marked transient
    where it was raised, or a connection error or timeout that escaped translation."""
    if isinstance(error, TransferkitError):
        return error.transient
    return isinstance(error, ConnectionError | TimeoutError)


def retry_transient(
    step: str,
    work: Callable[[], T],
    attempts: int = ATTEMPTS,
    first_delay: float = FIRST_DELAY,
    max_delay: float = MAX_DELAY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``work()``; after a transient error wait and call it again, at most ``attempts``
    times in all, waiting ``first_delay`` seconds, doubling up to ``max_delay``.

    ``work`` must be safe to call again after a failure: the core functions write their
    outputs atomically, and registration finds a version an earlier attempt left.

    Args:
        step: the step's name, for the log line of each retry.
        work: the step's core call.
        attempts: calls in all, at least 1.
        first_delay: seconds before the second call.
        max_delay: cap of the wait between calls.
        sleep: how to wait (tests pass a recorder).

    Returns:
        What ``work`` returned.

    Raises:
        Exception: the first error that is not transient, or the last transient one.
    """
    delay = first_delay
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            return work()
        except Exception as error:
            if attempt >= attempts or not is_transient(error):
                raise
            log.warning(
                "%s: transient error, attempt %d of %d in %.0f s: %s",
                step,
                attempt + 1,
                attempts,
                delay,
                error,
            )
        sleep(delay)
        delay = min(delay * BACKOFF, max_delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
