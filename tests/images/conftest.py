"""The CPU image, built once per test session with images/build.sh (see test_build.py), and the
container engine it lives in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "localhost/transferkit-test"


@dataclass(frozen=True)
class Image:
    tag: str
    version: str
    engine: str
    env: dict[str, str]

    def run(self, *command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        args = [self.engine, "run", "--rm", *(["--user", user] if user else []), self.tag]
        return subprocess.run(
            [*args, *command], env=self.env, capture_output=True, text=True, timeout=300
        )

    def sh(self, script: str, user: str | None = None) -> str:
        done = self.run("sh", "-c", script, user=user)
        assert done.returncode == 0, f"{script!r} failed in the image:\n{done.stdout}{done.stderr}"
        return done.stdout.strip()


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def source_tree(tmp: Path) -> Path:
    if os.environ.get("TRANSFERKIT_IMAGE_SOURCE") == "worktree":
        return ROOT
    clone = tmp / "transferkit"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    return clone


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    if shutil.which("podman") is None and not docker_answers():
        pytest.skip("no container engine: install podman (apt-get install podman) or docker")
    tmp = tmp_path_factory.mktemp("image")
    source = source_tree(tmp)
    # The engine and its settings, as images/build.sh chooses them.
    chosen = subprocess.run(
        [
            "bash",
            "-c",
            '. images/engine.sh && printf "%s\\n" "$ENGINE" '
            '"${CONTAINERS_CONF:-}" "${CONTAINERS_STORAGE_CONF:-}"',
        ],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    engine, containers_conf, storage_conf = [*chosen, "", "", ""][:3]
    env = dict(os.environ, ENGINE=engine, REGISTRY=REGISTRY, PYTHON=sys.executable)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if containers_conf:
        env["CONTAINERS_CONF"] = containers_conf
    if storage_conf:
        env["CONTAINERS_STORAGE_CONF"] = storage_conf
    command = (
        ["images/build.sh", "cpu"] if "BASE_IMAGE" in env else ["images/build.sh", "--base", "cpu"]
    )
    start = time.monotonic()
    built = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    assert built.returncode == 0, (
        f"{' '.join(command)} failed:\n{built.stdout[-8000:]}{built.stderr[-8000:]}"
    )
    with (source / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    if source != ROOT:
        # The wheelhouse (about 560 MB); the clone stays: CONTAINERS_CONF names its file.
        shutil.rmtree(source / "images" / "wheelhouse", ignore_errors=True)
    tag = f"{REGISTRY}/transferkit-cpu:{version}"
    size = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Size}}", tag],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    steps = [  # images/build.sh's summary lines: the base, the wheelhouse, the image
        line
        for line in built.stdout.splitlines()
        if line.startswith(("wheelhouse", "built", "base image"))
    ]
    report = {
        "tag": tag,
        "engine": engine,
        "source": str(source),
        "build_seconds": round(seconds, 1),
        "image_bytes": int(size),
        "steps": steps,
    }
    (tmp / "image-build.json").write_text(json.dumps(report, indent=2))
    print(f"\n{tag}: built in {seconds:.0f} s, {int(size) / 1e6:.0f} MB", *steps, sep="\n  ")
    return Image(tag=tag, version=version, engine=engine, env=env)
