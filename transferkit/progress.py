"""Progress for long work: a bar on a terminal, a few plain log lines everywhere else."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("transferkit.progress")


def progress(items: Iterable[T], total: int, description: str, unit: str = "batch") -> Iterator[T]:
    """Yield ``items``, showing progress.

    On a terminal this is a tqdm bar. Otherwise (KFP pods, the local runner's subprocesses, CI
    logs) it logs one line per tenth of the work with the rate, so logs stay short.
    """
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=description, unit=unit, leave=False)
        return
    started = time.perf_counter()
    step = max(total // 10, 1)
    for done, item in enumerate(items, start=1):
        yield item
        if done % step == 0 or done == total:
            elapsed = time.perf_counter() - started
            log.info(
                "%s: %d/%d %s (%.0f%%, %.1fs, %.1f %s/s)",
                description,
                done,
                total,
                unit + "es" if unit.endswith("h") else unit + "s",
                100 * done / max(total, 1),
                elapsed,
                done / max(elapsed, 1e-9),
                unit,
            )
