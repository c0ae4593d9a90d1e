"""Run every step of a local run in the transferkit image, through KFP's ``DockerRunner``.

``transferkit run`` normally runs each step in a subprocess of its own Python
(``SubprocessRunner``). With ``runtime.runner: docker`` each step runs in the image the compiled
pipeline names (``transferkit.containers.CPU_IMAGE``), through the Docker API: Docker's, or
podman's (``podman system service``, with ``DOCKER_HOST`` pointing at its socket). The image
must be there and built from this code (``check_engine``): images/build.sh labels it with a
digest of the source it installs.

The steps must see the same files at the same paths as the subprocess run, because the
config they receive holds absolute paths: KFP mounts the pipeline root itself; this module
adds the work dir (feature cache, MLflow's SQLite store), the feature cache and the SQLite
store where they lie outside it, and, read-only, the folders of local data files and local
backbones. ``package://`` backbones resolve inside the image, where the package is installed.

The container runs with the caller's uid and gid, so that what it writes belongs to the
caller, as in the subprocess run (for a non-root caller: non-root in the container), with
every capability dropped and no privilege escalation. HOME is /tmp: the image's home belongs
to its own user.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.containers import CPU_IMAGE, SOURCE_LABEL, source_digest
from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

# The host's settings that a step reads, passed to the container as they are.
_FORWARDED_PREFIXES = ("AWS_", "MLFLOW_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TRANSFERKIT_")
_FORWARDED = frozenset({"PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS"})
# Host settings that name host folders, which the container does not have.
_HOST_PATHS = frozenset({"HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"})


def _local_uris(config: PipelineConfig) -> list[tuple[str, bool]]:
    """(URI, is a folder) of every local input a step reads."""
    found: list[tuple[str, bool]] = []
    data = config.data
    for uri in (data.uri, data.train_uri, data.validation_uri, data.test_uri):
        if uri:
            found.append((uri, uri.endswith("/")))
    backbones = (
        [c.uri for c in config.backbone_selection.candidates]
        if config.backbone_selection is not None
        else [config.backbone.uri]
    )
    found += [(uri, True) for uri in backbones]
    strategies = [config.strategy]
    if config.sweep is not None:
        strategies += [branch.strategy for branch in config.sweep.branches]
    for strategy in strategies:
        unlabelled = getattr(strategy, "unlabelled_uri", None)
        if unlabelled:
            found.append((unlabelled, unlabelled.endswith("/")))
    drift = config.trigger.drift
    if drift is not None and drift.uri:
        found.append((drift.uri, drift.uri.endswith("/")))
    return found


def _folders(uri: str, folder: bool) -> list[Path]:
    """The host folder(s) that hold a local input: its own, or its parent's (with the real
    location too where links lead elsewhere); none for s3:// and package://."""
    if storage.parse(uri).scheme != "file":
        return []
    path = Path(storage.parse(uri).path)
    if not folder and not path.is_dir():
        path = path.parent
    # Mount targets are normalised paths ('a/../b' is not one); a step that opens a/../b
    # finds it as long as a exists in the container too (the work dir's mount makes it).
    places = [Path(os.path.normpath(path.absolute()))]
    real = path.resolve()
    if real != places[0]:
        places.append(real)
    return places


def _dotted_parents(uri: str) -> list[Path]:
    """The folders a local path walks up from ('a' of 'a/../b'): they must exist in the
    container too, or the path does not resolve there."""
    if "://" in uri and storage.parse(uri).scheme != "file":
        return []
    parts = Path(storage.parse(uri).path).absolute().parts
    return [
        Path(os.path.normpath(Path(*parts[:i]))) for i in range(1, len(parts)) if parts[i] == ".."
    ]


def _outermost(mounts: Iterable[tuple[Path, bool]], pipeline_root: Path) -> list[tuple[Path, bool]]:
    """Drop folders that a mount already covers at least as writably, and the pipeline root
    (KFP mounts it)."""
    wanted: dict[Path, bool] = {}
    for path, read_only in mounts:
        wanted[path] = wanted.get(path, True) and read_only
    kept = []
    for path, read_only in sorted(wanted.items()):
        if path == pipeline_root:
            continue
        covered = any(
            other != path and path.is_relative_to(other) and (read_only or not other_ro)
            for other, other_ro in wanted.items()
        )
        if not covered:
            kept.append((path, read_only))
    return kept


def container_mounts(config: PipelineConfig) -> list[tuple[Path, bool]]:
    """(host folder, read-only) pairs to mount at the same path in every step's container."""
    work_dir = Path(config.runtime.work_dir).absolute()
    writable = [work_dir]
    if storage.parse(config.feature_cache).scheme == "file":
        writable.append(Path(storage.parse(config.feature_cache).path).absolute())
    tracking = config.tracking_uri
    if tracking.startswith("sqlite:///"):
        writable.append(Path(tracking.removeprefix("sqlite:///")).absolute().parent)
    elif tracking.startswith("file:") or "://" not in tracking:
        writable.append(Path(storage.parse(tracking).path).absolute())
    for folder in writable:
        folder.mkdir(parents=True, exist_ok=True)
    mounts = [(folder, False) for folder in writable]
    for uri, is_folder in _local_uris(config):
        mounts += [(place, True) for place in _folders(uri, is_folder) if place.exists()]
    return _outermost(mounts, Path(config.pipeline_root).absolute())


def container_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every step's container: the host's step settings, HOME=/tmp."""
    environ = dict(os.environ if environ is None else environ)
    env = {
        key: value
        for key, value in environ.items()
        if (key in _FORWARDED or key.startswith(_FORWARDED_PREFIXES)) and key not in _HOST_PATHS
    }
    env["HOME"] = "/tmp"
    return env


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def check_engine(config: PipelineConfig) -> None:
    """Before any step: the Docker API answers, and the image the steps run in is there and
    was built from this code (its ``dev.transferkit.source`` label, see images/build.sh).

    Raises:
        ConfigError: one line naming what is wrong and what to do.
    """
    import docker

    if config.resources.train.accelerator is not None:
        raise ConfigError(
            "runtime.runner: docker runs every step on the CPU (no GPU passthrough): unset "
            "resources.train.accelerator, or use runtime.runner: subprocess"
        )
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as error:
        raise ConfigError(
            f"runtime.runner: docker, but no Docker API answers at {where} "
            f"({_first_line(error)}): start Docker, or `podman system service --time=0 "
            "unix:///PATH/podman.sock` and set DOCKER_HOST=unix:///PATH/podman.sock"
        ) from None
    try:
        try:
            image = client.images.get(CPU_IMAGE)
        except docker.errors.ImageNotFound:
            raise ConfigError(
                f"runtime.runner: docker, but the engine at {where} has no image {CPU_IMAGE}: "
                "build it with images/build.sh cpu"
            ) from None
        built_from = (image.labels or {}).get(SOURCE_LABEL)
        ours = source_digest()
        if not built_from:
            log.warning(
                "image %s has no %s label: it may hold other code than this transferkit",
                CPU_IMAGE,
                SOURCE_LABEL,
            )
        elif built_from != ours:
            raise ConfigError(
                f"runtime.runner: docker, but the image {CPU_IMAGE} was built from other "
                f"transferkit code (source {built_from}, this one {ours}): rebuild it with "
                "images/build.sh cpu"
            )
    finally:
        client.close()


def docker_runner(config: PipelineConfig, labels: dict[str, str] | None = None) -> Any:
    """KFP's ``DockerRunner`` for this run's steps (mounts, user, environment, host network),
    once ``check_engine`` has passed."""
    from docker.types import Mount
    from kfp import local

    check_engine(config)
    places = container_mounts(config)
    mounts = [
        Mount(target=str(path), source=str(path), type="bind", read_only=read_only)
        for path, read_only in places
    ]
    # A relative path of the config resolves to /cwd/../data: /cwd must exist in the
    # container, as an empty folder where no mount makes it.
    pipeline_root = Path(config.pipeline_root).absolute()
    targets = [path for path, _ in places] + [pipeline_root]
    empty = {
        str(parent): "ro,size=4k"
        for uri, _ in _local_uris(config)
        for parent in _dotted_parents(uri)
        if not any(
            parent == t or parent.is_relative_to(t) or t.is_relative_to(parent) for t in targets
        )
    }
    return local.DockerRunner(
        mounts=mounts,
        tmpfs=empty,
        user=f"{os.getuid()}:{os.getgid()}",
        environment=container_environment(),
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        network_mode="host",  # an MLflow server or S3 endpoint on localhost stays reachable
        labels=labels or {},
    )


def stop_containers(run_label: str, grace: float = 1.0) -> int:
    """Stop the containers of one run (``docker_runner``'s label); how many were running.

    An interrupted run stops its steps' processes (``transferkit.processes``), but a step in a
    container is a child of the container engine, not of this process.
    """
    import docker

    client = docker.from_env()
    try:
        running = client.containers.list(filters={"label": f"dev.transferkit.run={run_label}"})
        for container in running:
            container.stop(timeout=max(1, round(grace)))
        return len(running)
    finally:
        client.close()


def _run_container(
    client: Any, image: str, command: list[str], volumes: dict[str, Any], **run_args: Any
) -> int:
    """KFP's ``run_docker_container``, but the container is removed only after its exit
    status is read, and the log is printed in whole lines.

    KFP's own runs it with ``auto_remove=True`` and reads a container already gone as
    success (``docker.errors.NotFound`` → 0); podman removes an exited container at once,
    so every failed step would pass.
    """
    if ":" not in image.rsplit("/", 1)[-1]:
        image = f"{image}:latest"
    if not any(image in found.tags for found in client.images.list()):
        print(f"Pulling image {image!r}")
        client.images.pull(image)
    container = client.containers.create(
        image=image, command=command, volumes=volumes, auto_remove=False, **run_args
    )
    try:
        container.start()
        # Whole lines only: the engine streams what each write of the step held, and KFP
        # indents every print (a traceback's parts would each get an indent).
        pending = ""
        for chunk in container.logs(stream=True, follow=True):
            *lines, pending = (pending + chunk.decode(errors="replace")).split("\n")
            for line in lines:
                print(line)
        if pending:
            print(pending)
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


@contextlib.contextmanager
def exit_status_kept() -> Iterator[None]:
    """While a run is in this context, KFP's DockerRunner reads each step's exit status
    (``_run_container``)."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = _run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original
