"""Steps started from the warm helper (transferkit.warm_steps) behave as KFP's own subprocess:
same outputs, environment and working directory, failures and their tracebacks, a process of
their own; and whatever the helper cannot start runs as KFP runs it."""

# No `from __future__ import annotations`: KFP reads the components' annotations as types.
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kfp import dsl, local
from kfp.local.subprocess_task_handler import replace_python_executable

from transferkit import warm_steps


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def probe(name: str) -> str:
    import os

    print(f"probe pid={os.getpid()} parent={os.getppid()} cwd={os.getcwd()}")
    return os.environ.get(name, "<unset>")


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fails(message: str) -> None:
    raise ValueError(message)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def killed() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def runner(tmp_path: Path) -> None:
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )


def ready(warm: warm_steps.WarmSteps, timeout: float = 180.0) -> None:
    warm.start()
    assert warm.process is not None
    deadline = time.monotonic() + timeout
    while not warm.ready():
        assert warm.process.poll() is None, warm.report()
        assert time.monotonic() < deadline, "the helper did not get ready"
        time.sleep(0.2)


def line_of(output: str, start: str) -> dict[str, str]:
    line = next(line for line in output.splitlines() if line.strip().startswith(start))
    return dict(part.split("=", 1) for part in line.split()[1:])


def test_kfps_lightweight_command_is_recognised_and_nothing_else() -> None:
    container = probe.component_spec.implementation.container
    command = replace_python_executable(
        [*container.command, "--executor_input", "{}", "--function_to_execute", "probe"],
        sys.executable,
    )
    request = warm_steps.step_request(command)
    assert request is not None
    assert "def probe(name: str) -> str:" in request["source"]
    assert request["args"] == ["--executor_input", "{}", "--function_to_execute", "probe"]
    assert warm_steps.step_request([sys.executable, "-c", "print(1)"]) is None
    # What every run runs, cached or not, starts no helper (a cached rerun runs only those).
    assert warm_steps._always_runs(["--function_to_execute", "register_model"])
    assert not warm_steps._always_runs(request["args"])
    assert warm_steps.step_request(["sh", "-ec", "python3 x.py", "x"]) is None


def test_a_warm_step_returns_what_a_fresh_process_returns(
    runner: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("TRANSFERKIT_PROBE", "from the runner")
    monkeypatch.chdir(tmp_path)
    cold = probe(name="TRANSFERKIT_PROBE").output
    fresh = line_of(capsys.readouterr().out, "probe")
    with warm_steps.started() as warm:
        ready(warm)
        monkeypatch.setenv("TRANSFERKIT_PROBE", "set after the helper started")
        hot = probe(name="TRANSFERKIT_PROBE").output
        forked = line_of(capsys.readouterr().out, "probe")
        assert warm.warm == 1
        helper = warm.process.pid
    assert cold == "from the runner"
    assert hot == "set after the helper started"  # the step's environment, not the helper's
    assert forked["cwd"] == fresh["cwd"] == str(tmp_path)
    # A process of its own below the helper, which is below this one.
    assert int(forked["parent"]) == helper
    assert int(forked["pid"]) not in (helper, os.getpid())
    assert "warm start: 1 of 1 steps forked from the helper" in capsys.readouterr().out
    assert warm.process.poll() is not None  # stopped with the run
    assert not warm.folder.exists()


def test_a_failing_or_killed_warm_step_fails_with_its_traceback(
    runner: None, capsys: pytest.CaptureFixture
) -> None:
    with warm_steps.started() as warm:
        ready(warm)
        with pytest.raises(RuntimeError, match="fails"):
            fails(message="the step's own error")
        output = capsys.readouterr().out
        assert "Traceback (most recent call last)" in output
        assert output.strip().splitlines()[-1].strip() == "ValueError: the step's own error"
        with pytest.raises(RuntimeError, match="killed"):
            killed()
        assert warm.warm == 2
        # The helper lives on: the next step starts warm again.
        assert probe(name="HOME").output == os.environ["HOME"]
        assert warm.warm == 3


def test_without_the_helper_a_step_runs_as_kfp_runs_it(
    runner: None, capsys: pytest.CaptureFixture
) -> None:
    with warm_steps.started() as warm:
        ready(warm)
        warm.process.send_signal(signal.SIGTERM)
        warm.process.wait(timeout=30)
        assert probe(name="HOME").output == os.environ["HOME"]
        assert warm.warm == 0
        assert warm.steps == 1
    assert "the helper ended with status -15" in capsys.readouterr().out


def test_a_run_of_always_run_steps_only_starts_no_helper(
    runner: None, capsys: pytest.CaptureFixture
) -> None:
    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def close_run() -> str:
        return "closed"

    with warm_steps.started() as warm:
        assert close_run().output == "closed"
        assert warm.process is None
        assert warm.steps == 1
    assert "(not started: no cacheable step ran)" in capsys.readouterr().out


def test_the_helper_ends_when_the_run_that_started_it_is_gone(tmp_path: Path) -> None:
    script = (
        "import os, sys, time\n"
        "from transferkit.warm_steps import WarmSteps\n"
        "warm = WarmSteps()\n"
        "warm.start()\n"
        "print(warm.process.pid, warm.folder, flush=True)\n"
        "os._exit(0)\n"  # killed, as by SIGKILL: no cleanup
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    helper, folder = int(done.stdout.split()[0]), Path(done.stdout.split()[1])
    deadline = time.monotonic() + 120  # its imports first, then a second per check
    while Path(f"/proc/{helper}").exists():
        state = Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        assert time.monotonic() < deadline, "the helper outlived its runner"
        time.sleep(0.5)
    assert not folder.exists()
