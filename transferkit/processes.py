"""The processes this one started, found and stopped as a tree.

``transferkit run`` starts every step as a child process (KFP's local runner: ``sh`` →
``python``), and a step may start its own (data loader workers, training processes). A
signal to ``transferkit run`` alone reaches none of them, and Ctrl-C on a terminal reaches
only those still in its process group; killing the direct child alone orphans the rest. So
the tree is walked from this process (``/proc`` on Linux, ``ps`` elsewhere), frozen with
SIGSTOP so that nothing forks while it is walked, and then stopped: SIGTERM (a transferkit
step removes its half-written folders on it, see ``cli.configure_logging``), SIGKILL for
whatever still lives after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Seconds a stopped step gets to clean up after SIGTERM before SIGKILL.
GRACE = 5.0
_POLL = 0.05


@dataclass(frozen=True)
class Proc:
    """A process, told apart from a later one with the same pid by its start time."""

    pid: int
    start: str


# pid → (parent pid, state, start time)
_Table = dict[int, tuple[int, str, str]]


def _table() -> _Table:
    """Every process of the machine: its parent, state and start time."""
    table: _Table = {}
    if Path("/proc/self/stat").exists():
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    raw = handle.read().decode(errors="replace")
            except OSError:  # it ended while the folder was read
                continue
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = raw[raw.rindex(")") + 2 :].split()
            table[int(entry.name)] = (int(fields[1]), fields[0], fields[19])
        return table
    listing = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid=,stat="], capture_output=True, text=True, check=False
    ).stdout
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = (int(parts[1]), parts[2][:1], "")
    return table


def descendants(root: int | None = None, table: _Table | None = None) -> list[Proc]:
    """The live processes below ``root`` (default: this process), parents first."""
    table = _table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: list[Proc] = []
    todo = [os.getpid() if root is None else root]
    while todo:
        for child in sorted(children.get(todo.pop(0), [])):
            _, state, start = table[child]
            if state not in ("Z", "X"):
                found.append(Proc(child, start))
            todo.append(child)
    return found


def alive(proc: Proc, table: _Table | None = None) -> bool:
    """Whether ``proc`` still runs (a zombie, whose parent has yet to reap it, does not)."""
    table = _table() if table is None else table
    entry = table.get(proc.pid)
    return entry is not None and entry[2] == proc.start and entry[1] not in ("Z", "X")


def _send(proc: Proc, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, signum)


def stop_tree(grace: float = GRACE, hurry: Callable[[], bool] = lambda: False) -> list[Proc]:
    """Stop every process below this one and wait until none of them runs.

    Args:
        grace: seconds between SIGTERM and SIGKILL.
        hurry: polled while waiting; True sends SIGKILL at once (a second Ctrl-C).

    Returns:
        The processes that were stopped.
    """
    frozen: dict[int, Proc] = {}
    while True:  # stopped processes cannot fork: the walk ends
        new = [p for p in descendants() if p.pid not in frozen]
        if not new:
            break
        for proc in new:
            _send(proc, signal.SIGSTOP)
            frozen[proc.pid] = proc
    for proc in frozen.values():
        _send(proc, signal.SIGTERM)
    for proc in frozen.values():
        _send(proc, signal.SIGCONT)
    deadline = time.monotonic() + grace
    killed = False
    while True:
        table = _table()
        # A process started while the others cleaned up is stopped as well.
        for proc in descendants(table=table):
            if proc.pid not in frozen:
                frozen[proc.pid] = proc
                _send(proc, signal.SIGKILL if killed else signal.SIGTERM)
        left = [p for p in frozen.values() if alive(p, table)]
        # SIGKILL cannot be refused, but a process blocked in the kernel (a hung network
        # mount) dies only when it returns: waiting stops a grace period after it.
        if not left or (killed and time.monotonic() >= deadline + grace):
            return list(frozen.values())
        if not killed and (time.monotonic() >= deadline or hurry()):
            killed = True
            deadline = time.monotonic()
            for proc in left:
                _send(proc, signal.SIGKILL)
        time.sleep(_POLL)
