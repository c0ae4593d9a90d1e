"""The container images: the Dockerfile builds from files that exist, runs as non-root, pins
the same torch as the README's setup, and its tags are the ones compiled pipelines name.

No image is built here (this machine has no container engine); what a build would read is
checked with a Dockerfile parser instead.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from transferkit.components.images import CPU_IMAGE, CUDA_IMAGE, REGISTRY
from transferkit.pipelines import COMPILED, COMPILED_SWEEP

from transferkit import __version__

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(fileobj=(ROOT / "images" / "Dockerfile").open("rb"))
    return parser


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def copy_sources(parser: DockerfileParser) -> list[str]:
    sources = []
    for value in instructions(parser, "COPY"):
        parts = value.split()
        if any(p.startswith("--from=") for p in parts):
            continue  # from an earlier stage, not the build context
        sources += [p for p in parts[:-1] if not p.startswith("--")]
    return sources


def ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_every_copied_path_exists_and_is_not_docker_ignored(dockerfile: DockerfileParser) -> None:
    sources = copy_sources(dockerfile)
    assert {"pyproject.toml", "constraints.txt", "transferkit", "components"} <= set(sources)
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sources:
        assert (ROOT / source).exists(), f"images/Dockerfile copies {source}, which is missing"
        assert not ignored(source, patterns), f".dockerignore hides {source} from the build"
    # The package's source folders (pyproject's package-dir) all reach the image.
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    assert set(package_dirs.values()) <= set(sources)


def test_the_image_runs_as_an_unprivileged_user(dockerfile: DockerfileParser) -> None:
    users = instructions(dockerfile, "USER")
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")
    assert dockerfile.structure[-1]["instruction"] in ("USER", "CMD", "ENTRYPOINT")
    # Nothing after the last USER switches back to root.
    last_user = max(i for i, x in enumerate(dockerfile.structure) if x["instruction"] == "USER")
    assert all(x["instruction"] != "RUN" for x in dockerfile.structure[last_user + 1 :])


def test_installs_are_locked_and_torch_matches_the_readme(dockerfile: DockerfileParser) -> None:
    runs = " ".join(instructions(dockerfile, "RUN"))
    assert "pip install -c constraints.txt ." in runs
    for command in re.findall(r"pip install [^&]*", runs):
        assert "constraints.txt" in command or '"torch==${TORCH_VERSION}"' in command, command
    pinned = re.search(r"ARG TORCH_VERSION=(\S+)", (ROOT / "images" / "Dockerfile").read_text())
    assert pinned
    for setup in ((ROOT / ".ci" / "run").read_text(), (ROOT / "README.md").read_text()):
        assert f"pip install torch=={pinned.group(1)}" in setup
    env = " ".join(instructions(dockerfile, "ENV"))
    assert "HF_HUB_OFFLINE=1" in env  # no hub downloads at run time


def test_build_script_tags_are_the_images_compiled_pipelines_name() -> None:
    script = (ROOT / "images" / "build.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "images" / "build.sh")]).returncode == 0
    assert f"registry=${{REGISTRY:-{REGISTRY}}}" in script
    assert 'tag="$registry/transferkit-$name:$version"' in script
    assert "for image in cpu:cpu cuda:cu128" in script
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == __version__
    assert f"{REGISTRY}/transferkit-cpu:{version}" == CPU_IMAGE
    assert f"{REGISTRY}/transferkit-cuda:{version}" == CUDA_IMAGE
    for compiled in (COMPILED, COMPILED_SWEEP):
        images = set(re.findall(r"image: (\S+)", compiled.read_text()))
        assert images == {CPU_IMAGE}, f"{compiled.name} names {images}"
