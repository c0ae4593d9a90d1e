"""Progress for long work: a bar on a terminal, periodic ``transferkit.progress`` log lines
everywhere else.

A step of a pipeline never runs on a terminal (KFP's local runner and a pod both give it a
pipe), so it reports through its log: one line at most every ``TRANSFERKIT_PROGRESS_SECONDS``
(10 s by default, as a pod's log wants it; ``transferkit run`` sets 2 s for its steps and shows
the latest line in the step's line on the screen), and always the last. Each line says what is
done of what, the rate and the time left::

    embed train: 235/474 batches (50%), 19.1 batches/s, ETA 13 s
    train: 120/480 steps (25%), 3.1 steps/s, ETA 1 min 56 s, epoch 2/5, loss 0.4123
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("transferkit.progress")
INTERVAL_ENV = "TRANSFERKIT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0


def interval() -> float:
    """Seconds between two progress lines of one loop."""
    try:
        return max(float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)), 0.0)
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    whole = max(round(seconds), 0)
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _plural(unit: str) -> str:
    return unit + "es" if unit.endswith(("h", "s")) else unit + "s"


class Ticker:
    """Progress of one loop of ``total`` units, logged at most every ``interval()`` seconds."""

    def __init__(self, description: str, total: int, unit: str = "batch") -> None:
        self.description, self.total, self.unit = description, max(int(total), 0), unit
        self.every = interval()
        self.started = self.last = time.perf_counter()
        self.first: int | None = None  # units done before the first timed one (a resumed loop)

    def update(self, done: int, note: str = "") -> bool:
        """``done`` units of ``total`` are done; ``note`` adds the loop's own figures. Whether
        a line was logged."""
        now = time.perf_counter()
        if self.first is None:  # a resumed loop: what it did before is not this rate
            self.first = max(done - 1, 0)
        if done < self.total and now - self.last < self.every:
            return False
        self.last = now
        elapsed = now - self.started
        rate = (done - self.first) / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        units = _plural(self.unit)
        parts = [
            f"{self.description}: {done}/{self.total} {units} "
            f"({100 * done / max(self.total, 1):.0f}%)",
            f"{rate:.1f} {units}/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/{self.unit}",
            f"ETA {duration(eta)}" if done < self.total else f"took {duration(elapsed)}",
        ]
        if note:
            parts.append(note)
        log.info("%s", ", ".join(parts))
        return True


def progress(items: Iterable[T], total: int, description: str, unit: str = "batch") -> Iterator[T]:
    """Yield ``items``, showing progress: a tqdm bar on a terminal, else a ``Ticker`` (timed
    from this call, so the first item's work counts)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return iter(tqdm(items, total=total, desc=description, unit=unit, leave=False))
    return _ticking(items, Ticker(description, total, unit))


def _ticking(items: Iterable[T], ticker: Ticker) -> Iterator[T]:
    for done, item in enumerate(items, start=1):
        yield item
        ticker.update(done)


def note(message: str) -> None:
    """A progress line that is not a count: where a multi-part step is (an auto rung, a
    penalty of the probe's grid). Shown in the step's line like a count."""
    log.info("%s", message)
