"""Stopping the process tree a run started, and a step that cleans up on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from transferkit import processes

# A process tree three levels deep under one Python: a shell with two sleeps below it (what
# killing only the direct child would orphan), and a Python that ignores SIGTERM. Then this
# Python stops the tree and reports what it stopped.
TREE = """
import json, subprocess, sys, time
from transferkit import processes
shell = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"])
ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
stubborn = subprocess.Popen(
    [sys.executable, "-c", ignore + "print('ready', flush=True); time.sleep(300)"],
    stdout=subprocess.PIPE, text=True)
assert stubborn.stdout.readline().strip() == "ready"
while len(processes.descendants()) < 4:
    time.sleep(0.05)
before = processes.descendants()
started = time.monotonic()
stopped = processes.stop_tree(grace=1.0)
took = time.monotonic() - started
print(json.dumps({"before": [[p.pid, p.start] for p in before],
                  "stopped": [[p.pid, p.start] for p in stopped],
                  "left": len(processes.descendants()), "took": took}))
"""


def test_the_whole_tree_stops_and_a_process_ignoring_sigterm_is_killed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TREE], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    before = {processes.Proc(pid, start) for pid, start in report["before"]}
    stopped = {processes.Proc(pid, start) for pid, start in report["stopped"]}
    assert len(before) == 4  # sh, its two sleeps, the stubborn Python
    assert before <= stopped
    assert report["left"] == 0
    # Everything answered SIGTERM but the stubborn one, which SIGKILL ended after the grace.
    assert 1.0 <= report["took"] < 30
    assert not any(processes.alive(p) for p in stopped)


def test_descendants_are_found_below_a_given_root_and_zombies_do_not_count() -> None:
    shell = subprocess.Popen(["sh", "-c", "sleep 300 & exec sleep 301"])
    try:
        for _ in range(200):
            found = processes.descendants(shell.pid)
            if found:
                break
            time.sleep(0.05)
        assert len(found) == 1  # the background sleep; the shell itself is the root
        child = found[0]
        assert processes.alive(child)
        assert Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\0")[:2] == [
            b"sleep",
            b"300",
        ]
    finally:
        for proc in processes.descendants(shell.pid):
            processes._send(proc, signal.SIGKILL)
        shell.kill()
        shell.wait()


# A step: configure_logging, then a folder half-written inside storage.atomic_dir.
STEP = """
import sys, time
from pathlib import Path
from transferkit import storage
from transferkit.cli import configure_logging
configure_logging()
with storage.atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half.npy").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(300)
"""


def test_a_step_stopped_by_sigterm_removes_its_half_written_folder(tmp_path: Path) -> None:
    step = subprocess.Popen(
        [sys.executable, "-c", STEP, str(tmp_path / "features")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert step.stdout is not None
    half = Path(step.stdout.readline().strip())
    assert (half / "half.npy").exists()
    step.send_signal(signal.SIGTERM)
    assert step.wait(timeout=60) == 128 + signal.SIGTERM
    assert not half.exists()
    assert list(tmp_path.iterdir()) == []
