"""``transferkit run`` with ``runtime.runner: docker``: every step of the quickstart in the CPU
image built by conftest's fixture (from a clean clone of HEAD), through KFP's ``DockerRunner`` and
the Docker API (podman's ``podman system service`` here, Docker's where it answers).

The same config runs once in subprocesses and once in containers, on a subset of SST-2 with
the packaged MiniLM, registering in one MLflow store: the test metrics are equal and the model
is registered once (the container trained the same bytes: its registration reuses the
version). A step that fails inside its container ends the run with the same one-line error as
in a subprocess; an image missing or built from other code is refused
before any step starts. bench/quickstart_containers.py times the whole quickstart both ways.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images.conftest import ROOT, Image
from transferkit.containers import CPU_IMAGE, SOURCE_LABEL

pytestmark = [pytest.mark.image, pytest.mark.slow]

CONFIG = "examples/sst2-quickstart.yaml"
# A subset that trains and tests in seconds: the point is that both runners agree.
SUBSET = ["data.max_rows=1500"]


@pytest.fixture(scope="module")
def docker_host(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DOCKER_HOST of an engine that holds the image: podman's API service, started here (the
    image's storage and settings), or Docker's own socket."""
    if image.engine == "docker":
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    socket = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(
        [image.engine, "system", "service", "--time=0", f"unix://{socket}"],
        env=image.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import docker

        deadline = time.monotonic() + 60
        while True:
            try:
                docker.DockerClient(base_url=f"unix://{socket}", timeout=10).ping()
                break
            except Exception:
                if time.monotonic() > deadline or service.poll() is not None:
                    raise
                time.sleep(0.2)
        yield f"unix://{socket}"
    finally:
        service.terminate()
        service.wait(timeout=30)


@pytest.fixture(scope="module")
def tagged(image: Image, docker_host: str) -> str:
    """The built image under the name the pipeline's components give (``CPU_IMAGE``)."""
    subprocess.run([image.engine, "tag", image.tag, CPU_IMAGE], env=image.env, check=True)
    return docker_host


def run(
    docker_host: str, folder: Path, runner: str, *overrides: str
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``transferkit run`` of the quickstart subset with this runner, in ``folder``."""
    summary = folder / f"{runner}-summary.json"
    pairs = [
        *SUBSET,
        f"runtime.runner={runner}",
        f"runtime.work_dir={folder / (runner + '-work')}",
        f"registry.tracking_uri=sqlite:///{folder / 'mlflow' / 'mlflow.db'}",
        *overrides,
    ]
    script = Path(sys.executable).parent / "transferkit"
    command = [str(script), "run", CONFIG, "--summary", str(summary)]
    command += [arg for pair in pairs for arg in ("--set", pair)]
    env = dict(os.environ, DOCKER_HOST=docker_host)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    result = json.loads(summary.read_text()) if done.returncode == 0 else {}
    return done, result


def test_the_quickstart_in_containers_equals_the_subprocess_run(
    tagged: str, tmp_path: Path
) -> None:
    timings = {}
    results = {}
    for runner in ("subprocess", "docker"):
        started = time.monotonic()
        done, results[runner] = run(tagged, tmp_path, runner)
        timings[runner] = time.monotonic() - started
        assert done.returncode == 0, f"{runner}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    print(
        f"\nquickstart subset ({' '.join(SUBSET)}): subprocess {timings['subprocess']:.0f} s, "
        f"containers {timings['docker']:.0f} s"
    )
    ours, theirs = results["docker"], results["subprocess"]

    def figures(metrics: dict[str, float]) -> dict[str, float]:  # timings differ run to run
        return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}

    assert figures(ours["metrics"]) == figures(theirs["metrics"])
    assert "test_accuracy" in figures(ours["metrics"])
    assert ours["metrics"]["test_accuracy"] > 0.7
    # Nothing was served from a cache: each run did every step in its own way.
    assert ours["cached_steps"] == theirs["cached_steps"] == []
    # Both registered in the one store, and the container trained the same bytes: the second
    # registration found the first's version by the model's fingerprint and reused it.
    assert ours["model_uri"] == theirs["model_uri"] == "models:/sst2-sentiment/1"
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    store = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(store.search_model_versions("name = 'sst2-sentiment'")) == 1
    experiment = store.get_experiment_by_name("transferkit").experiment_id
    runs = store.search_runs([experiment], "tags.`transferkit.run_role` = 'pipeline'")
    assert sorted(run.info.status for run in runs) == ["FINISHED", "FINISHED"]
    # What the containers wrote belongs to the caller, as in a subprocess run.
    work = tmp_path / "docker-work"
    owners = {path.stat().st_uid for path in work.rglob("*")}
    assert owners == {os.getuid()}


def test_a_step_that_fails_in_its_container_is_the_same_one_line_error(
    tagged: str, tmp_path: Path
) -> None:
    errors = {}
    for runner in ("subprocess", "docker"):
        done, _ = run(tagged, tmp_path, runner, "data.text_column=review")
        assert done.returncode != 0
        lines = [line for line in done.stderr.splitlines() if "failed:" in line]
        assert len(lines) == 1, done.stderr[-4000:]
        # The log file differs (its run stamp); the rest is the same.
        errors[runner] = lines[0].split(" (log: ")[0]
    assert errors["docker"] == errors["subprocess"]
    assert errors["docker"].startswith("error: ingest_data failed:")
    assert "review" in errors["docker"]


def test_an_image_built_from_other_code_is_refused_before_any_step(
    image: Image, tagged: str, tmp_path: Path
) -> None:
    # The same image with another source label, in CPU_IMAGE's place for this test.
    context = tmp_path / "context"
    context.mkdir()
    other = f"FROM {image.tag}\nLABEL {SOURCE_LABEL}=0123456789abcdef\n"
    (context / "Dockerfile").write_text(other)
    subprocess.run(
        [image.engine, "build", "--quiet", "--tag", CPU_IMAGE, str(context)],
        env=image.env,
        check=True,
        capture_output=True,
    )
    try:
        done, _ = run(tagged, tmp_path, "docker")
        assert done.returncode != 0
        assert "built from other transferkit code (source 0123456789abcdef" in done.stderr
        assert "rebuild it with images/build.sh cpu" in done.stderr
        assert not (tmp_path / "docker-work" / "pipeline-root").exists()
    finally:
        subprocess.run([image.engine, "tag", image.tag, CPU_IMAGE], env=image.env, check=True)
