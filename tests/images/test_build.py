"""The CPU image, built for real with images/build.sh and then run: it installs the committed
code (a clean clone of HEAD, as CI builds it), runs as an unprivileged user, carries no
compiler, wheelhouse, pip cache or credentials, and its entry points work.

Not in the default run (about 4 minutes cold on 2 cores): ``pytest -m image -s`` prints the
build time and the image size and writes them to image-build.json in the test's temporary
folder. It skips only where there is no container engine (.ci/run installs podman).

    TRANSFERKIT_IMAGE_SOURCE=worktree  build the working tree instead of a clean clone of HEAD
    BASE_IMAGE=python:3.11-slim-bookworm  a base from a registry instead of the debootstrap one
"""

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

pytestmark = pytest.mark.image

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


@pytest.fixture(scope="module")
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


def test_runs_as_an_unprivileged_user(image: Image) -> None:
    assert image.sh("id -u") != "0"
    assert image.sh("id -u") == "10001"


def test_the_installed_transferkit_is_the_tags_version(image: Image) -> None:
    installed = image.sh(
        "python -c \"import importlib.metadata as m; print(m.version('transferkit'))\""
    )
    assert installed == image.tag.rsplit(":", 1)[1] == image.version


def test_the_pipelines_and_a_cpu_torch_import(image: Image) -> None:
    printed = image.sh("python -c 'import transferkit.pipelines, torch; print(torch.__version__)'")
    assert printed.endswith("+cpu"), printed


def test_the_default_command_is_the_cli_help(image: Image) -> None:
    done = image.run()  # CMD: transferkit --help
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()
    assert image.sh("transferkit --help") == done.stdout.strip()


def test_no_compiler(image: Image) -> None:
    found = image.sh(
        "for c in gcc cc g++ c++ clang cpp ld; do command -v $c || true; done", user="0"
    )
    assert found == "", f"compilers in the image: {found}"


def test_no_credentials_wheelhouse_or_pip_cache(image: Image) -> None:
    # As root, which sees every home (an unprivileged user cannot look into /root). The base's
    # own pip and setuptools wheels (/usr/share/python-wheels, for venv) are not the wheelhouse.
    paths = [
        "/root/.aws",
        "/home/transferkit/.aws",
        "/root/.netrc",
        "/home/transferkit/.netrc",
        "/root/.config/pip/pip.conf",
        "/home/transferkit/.config/pip/pip.conf",
        "/etc/pip.conf",
        "/root/.cache/pip",
        "/home/transferkit/.cache/pip",
        "/wheels",
        "/src",
        "/root/.docker",
        "/home/transferkit/.docker",
    ]
    present = image.sh(f"for p in {' '.join(paths)}; do [ ! -e $p ] || echo $p; done", user="0")
    assert present == "", f"in the image: {present}"
    leftovers = image.sh(
        "find / -xdev \\( -name 'transferkit-*.whl' -o -name 'torch-*.whl' -o -name wheelhouse"
        " -o -path '*/.cache/pip' -o -name .netrc -o -name .git-credentials \\) -print",
        user="0",
    )
    assert leftovers == "", f"in the image: {leftovers}"
    env = image.sh("env")
    names = {line.split("=", 1)[0] for line in env.splitlines() if "=" in line}
    secrets = {n for n in names if n.startswith("AWS_") or n == "MLFLOW_TRACKING_PASSWORD"}
    assert not secrets, f"credentials in the image's environment: {secrets}"
    assert "HF_HUB_OFFLINE=1" in env.splitlines()
