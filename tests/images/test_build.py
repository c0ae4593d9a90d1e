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

import pytest

from tests.images.conftest import Image

pytestmark = pytest.mark.image


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
