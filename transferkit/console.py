"""What ``transferkit run`` shows while the pipeline runs: one line per step, and the running
step's live progress.

On a terminal the running step's line is redrawn every second: its elapsed time and the
latest progress line its process logged (``transferkit.progress``: batches, rate and ETA for
extraction and evaluation; step, epoch, loss, last validation metric and ETA for training;
the rung of ``auto``, the penalty of the probe), so the screen never stands still for more
than a second. Elsewhere (CI logs, a file) progress comes as plain lines, at most one per
``PLAIN_EVERY`` seconds a step. ``-q`` shows the step lines only.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import TextIO

from transferkit.progress import duration

PLAIN_EVERY = 15.0  # seconds between two plain progress lines of one step (not a terminal)
REDRAW_EVERY = 1.0  # seconds between two redraws of the running line (a terminal)


class Console:
    """Turns the runner's events ('start train', 'progress train …', 'done train 12.3') into
    the step table's lines."""

    def __init__(self, out: TextIO, verbose: bool = False, quiet: bool = False) -> None:
        # Bound now: while the pipeline runs, sys.stderr is redirected into the run's log.
        self.out = out
        self.tty = out.isatty()
        self.verbose, self.quiet = verbose, quiet
        self._transient = False
        self._lock = threading.RLock()
        self._running: str | None = None  # the step whose line is live, as shown
        self._since = 0.0
        self._latest = ""  # its latest progress line
        self._plain: dict[str, float] = {}  # step → when its last plain progress line was
        self._stop = threading.Event()
        self._redraw: threading.Thread | None = None

    def close(self) -> None:
        """Stop redrawing and leave the cursor on a fresh line."""
        self._stop.set()
        if self._redraw is not None:
            self._redraw.join(timeout=2 * REDRAW_EVERY)
        with self._lock:
            if self._transient:
                self.out.write("\r\x1b[2K")
                self.out.flush()
                self._transient = False

    def _print(self, text: str, transient: bool = False) -> None:
        with self._lock:
            if self._transient:
                self.out.write("\r\x1b[2K")
            if transient:  # one screen line: a wrapped line cannot be redrawn in place
                text = text[: max(shutil.get_terminal_size().columns - 1, 20)]
            self.out.write(text if transient else text + "\n")
            self.out.flush()
            self._transient = transient

    def _live_line(self) -> str:
        elapsed = duration(time.perf_counter() - self._since)
        tail = f"  {self._latest}" if self._latest and not self.quiet else ""
        return f"  ▸ {self._running:<17} running… {elapsed}{tail}"

    def _redraw_loop(self) -> None:
        while not self._stop.wait(REDRAW_EVERY):
            with self._lock:
                if self._running is not None:
                    self._print(self._live_line(), transient=True)

    def _start(self, step: str) -> None:
        with self._lock:
            self._running, self._since, self._latest = step, time.perf_counter(), ""
            self._plain[step.split()[0]] = self._since
            if not self.tty:
                self._print(f"  ▸ {step:<17} running…")
                return
            self._print(self._live_line(), transient=True)
            if self._redraw is None:
                self._redraw = threading.Thread(
                    target=self._redraw_loop, name="transferkit-console", daemon=True
                )
                self._redraw.start()

    def _progress(self, step: str, message: str) -> None:
        if self.quiet:
            return
        with self._lock:
            if self.tty:
                self._latest = message
                if self._running is not None:
                    self._print(self._live_line(), transient=True)
                return
            now = time.perf_counter()
            if now - self._plain.get(step, 0.0) >= PLAIN_EVERY:
                self._plain[step] = now
                self._print(f"    {step}: {message}")

    def __call__(self, event: str) -> None:
        kind, _, rest = event.partition(" ")
        if kind == "start":
            self._start(rest)
            return
        if kind == "progress":
            step, _, message = rest.partition(" ")
            self._progress(step, message)
            return
        with self._lock:
            if kind in ("done", "failed"):
                self._running = None
            if kind == "retry":
                step, attempt = rest.split()
                self._print(f"  ↻ {step:<17} attempt {attempt} (retry policy)")
                self._start(step)
            elif kind == "cached":
                self._print(f"  ✓ {rest:<17} cached")
            elif kind == "done":
                step, seconds = rest.rsplit(" ", 1)
                self._print(f"  ✓ {step:<17} {float(seconds):7.1f} s")
            elif kind == "failed":
                step, seconds = rest.rsplit(" ", 1)
                self._print(f"  ✗ {step:<17} failed after {float(seconds):.1f} s")
            elif kind == "log":
                level, _, message = rest.split(" ", 2)
                if level != "INFO":
                    self._print(f"    {level.lower()}: {message}")
                elif self.verbose:
                    self._print(f"    {message}")
                if self.tty and self._running is not None:  # the live line again, below it
                    self._print(self._live_line(), transient=True)
