"""The container images: the Dockerfile builds from files that exist, installs only from the
wheelhouse images/build.sh resolves (against the locks), runs as non-root, pins the same torch
as the README's setup, and its tags are the ones compiled pipelines name.

What a build would read is checked here with a Dockerfile parser, in the default run; the image
is built for real and run by tests/images/test_build.py (pytest -m image).
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


def stages(parser: DockerfileParser) -> list[list[dict[str, str]]]:
    """The instructions of each build stage, in order."""
    found: list[list[dict[str, str]]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def test_every_copied_path_exists_and_is_not_docker_ignored(dockerfile: DockerfileParser) -> None:
    sources = copy_sources(dockerfile)
    assert set(sources) == {"constraints.txt", "images/wheelhouse"}
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sources:
        assert not ignored(source, patterns), f".dockerignore hides {source} from the build"
    assert (ROOT / "constraints.txt").exists()
    # The wheelhouse is what images/build.sh resolves before it builds (the transferkit wheel,
    # made from this tree, among its wheels), and is never committed.
    script = (ROOT / "images" / "build.sh").read_text()
    assert "wheelhouse=images/wheelhouse " in script
    assert 'pip wheel --quiet --no-deps --wheel-dir "$wheelhouse" "$wheel_source"' in script
    assert "images/wheelhouse/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_wheelhouse_never_becomes_a_layer_of_the_image(dockerfile: DockerfileParser) -> None:
    *build, final = stages(dockerfile)
    assert build, "no build stage: the wheelhouse would be copied into the image"
    assert not [i for i in final if i["instruction"] in ("COPY", "ADD")], final
    runs = [i["value"] for i in final if i["instruction"] == "RUN"]
    assert any("--mount=type=bind,from=wheels" in run for run in runs)
    # Every stage starts from the same base, which a build argument chooses.
    assert {i["value"] for s in stages(dockerfile) for i in s if i["instruction"] == "FROM"} == {
        "${BASE_IMAGE} AS wheels",
        "${BASE_IMAGE}",
    }
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in (ROOT / "images/Dockerfile").read_text()


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
    installs = re.findall(r"pip install [^&;]*", runs)
    assert len(installs) == 3, installs  # torch from the wheelhouse or an index; transferkit
    for command in installs:
        assert "-c /wheels/constraints.txt" in command, command
        if "--index-url" in command:
            # Only the CUDA image's torch comes from an index: PyTorch's, pinned.
            assert '"torch==${TORCH_VERSION}+${TORCH_VARIANT}"' in command, command
            assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in command, command
        else:
            assert "--no-index --find-links /wheels/wheelhouse" in command, command
    # torch pinned with its build: the wheelhouse's CPU one, or PyTorch's CUDA one.
    assert runs.count('"torch==${TORCH_VERSION}+${TORCH_VARIANT}"') == 2
    assert '"transferkit${TRANSFERKIT_VERSION:+==$TRANSFERKIT_VERSION}"' in runs
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
    assert "--push) push=true" in script
    # The CUDA image's torch comes from PyTorch's index, the CPU image's from the wheelhouse.
    assert '[[ "$variant" == cpu ]] || source=index' in script
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == __version__
    assert f"{REGISTRY}/transferkit-cpu:{version}" == CPU_IMAGE
    assert f"{REGISTRY}/transferkit-cuda:{version}" == CUDA_IMAGE
    for compiled in (COMPILED, COMPILED_SWEEP):
        images = set(re.findall(r"image: (\S+)", compiled.read_text()))
        assert images == {CPU_IMAGE}, f"{compiled.name} names {images}"
