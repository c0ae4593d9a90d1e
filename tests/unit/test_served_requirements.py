"""What a registered model needs to be served outside this process: its requirements.txt names
only installable things (transferkit itself as the wheel logged with the model), and
``mlflow models serve`` builds that environment with MLflow's default manager and answers."""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from packaging.utils import canonicalize_name

import transferkit
from tests.unit.test_register_model import register, with_store
from transferkit.registry import fetch_logged_model
from transferkit.served_env import (
    SERVED_DISTRIBUTIONS,
    WHEELS,
    build_served_wheel,
    served_requirements,
)

# Imported by the serving code's closure, but only by fetching, reading and storage functions
# that a served model never calls: the compiled (OpenVINO) feature extractor, s3:// storage, the
# Hugging Face Hub download.
NOT_ON_THE_SERVING_PATH = {"openvino", "boto3", "botocore", "huggingface_hub", "httpx2"}
TEXTS = [
    "a wonderful, moving film",
    "a dull, lifeless mess",
    "it has its moments, but the plot drags",
    "one of the best performances of the year",
]


def _module_file(name: str) -> Path | None:
    root = Path(transferkit.__file__).parent.parent
    path = root.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def serving_imports() -> set[str]:
    """Top-level third-party modules that pyfunc_entry imports, directly or through transferkit
    modules, at module level or inside functions."""
    seen: set[str] = set()
    third: set[str] = set()
    todo = ["transferkit.pyfunc_entry"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:  # a name imported from a module, not a module
            continue
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents run first
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package[: len(package) - node.level + 1], base]).strip(".")
                found = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for module in found:
                top = module.split(".")[0]
                if top == "transferkit":
                    todo.append(module)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third.add(top)
    return third


def test_the_requirements_name_every_distribution_the_serving_code_imports() -> None:
    imported = serving_imports()
    assert {"torch", "transformers", "mlflow", "pandas", "safetensors"} <= imported
    distributions = packages_distributions()
    named = {
        canonicalize_name(line.split("==")[0])
        for line in served_requirements("transferkit-0.1.0-py3-none-any.whl")[1:]
    }
    missing = {
        module: distributions.get(module)
        for module in imported - NOT_ON_THE_SERVING_PATH
        if not named & {canonicalize_name(d) for d in distributions.get(module, [module])}
    }
    assert missing == {}
    # And nothing named that the serving code does not import (mlflow: the scoring server).
    imported_distributions = {
        canonicalize_name(d) for module in imported for d in distributions.get(module, [module])
    }
    assert named - imported_distributions == set()
    assert len(set(SERVED_DISTRIBUTIONS)) == len(SERVED_DISTRIBUTIONS)


def test_the_served_wheel_holds_the_core_library_and_installs_without_dependencies(
    tmp_path: Path,
) -> None:
    wheel = build_served_wheel(tmp_path)
    assert wheel.name == f"transferkit-{transferkit.__version__}-py3-none-any.whl"
    (tmp_path / "again").mkdir()
    again = build_served_wheel(tmp_path / "again")
    assert again.read_bytes() == wheel.read_bytes()  # reproducible, byte for byte

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"transferkit-{transferkit.__version__}.dist-info"
        assert names[-3:] == [f"{info}/METADATA", f"{info}/WHEEL", f"{info}/RECORD"]
        sources = sorted(
            f"transferkit/{p.relative_to(Path(transferkit.__file__).parent).as_posix()}"
            for p in Path(transferkit.__file__).parent.rglob("*.py")
            if "__pycache__" not in p.parts
            and p.relative_to(Path(transferkit.__file__).parent).parts[0]
            not in {"components", "pipelines"}
        )
        assert names[:-3] == sources
        assert "transferkit/pyfunc_entry.py" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert "Requires-Dist" not in archive.read(f"{info}/METADATA").decode()
        record = archive.read(f"{info}/RECORD").decode().splitlines()
        assert len(record) == len(names)
        for line in record[:-1]:
            name, digest, size = line.rsplit(",", 2)
            data = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert (digest, int(size)) == (f"sha256={expected.decode()}", len(data))

    # pip installs it as it is (no dependencies to resolve), and it imports from there: the
    # layout of a non-editable install.
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        "import transferkit, transferkit.serving, transferkit.training.model;"
        "print(transferkit.__file__, transferkit.__version__)"
    )
    # The target comes before site-packages, whose editable install's finder comes last.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    where, version = out.stdout.split()
    assert Path(where).is_relative_to(target)
    assert version == transferkit.__version__


def test_a_wheel_install_of_transferkit_logs_the_same_served_wheel(tmp_path: Path) -> None:
    """Installed from its wheel (the images), transferkit's folder also holds the KFP wrappers
    and, once imported, caches: the served wheel is the same file as from this checkout."""
    package = Path(transferkit.__file__).parent
    checkout = package.parent
    if not (checkout / "components").is_dir():
        pytest.skip("transferkit is not an editable install of a checkout here")
    site = tmp_path / "site-packages"
    shutil.copytree(package, site / "transferkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("components", "pipelines"):
        shutil.copytree(checkout / name, site / "transferkit" / name)
    (site / "transferkit" / "__pycache__").mkdir()
    (site / "transferkit" / "__pycache__" / "registry.cpython-311.pyc").write_bytes(b"junk")
    info = site / f"transferkit-{transferkit.__version__}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: transferkit\nVersion: {transferkit.__version__}\n"
    )
    code = (
        "import sys, transferkit; from pathlib import Path;"
        "from transferkit.served_env import build_served_wheel;"
        "assert Path(transferkit.__file__).is_relative_to(sys.argv[1]), transferkit.__file__;"
        "print(build_served_wheel(Path(sys.argv[2])))"
    )
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(site), str(tmp_path / "out")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).read_bytes() == build_served_wheel(tmp_path).read_bytes()


def local_torch_wheel() -> Path:
    """The running torch's own wheel in pip's find-links (a CPU build here); fails otherwise, so
    that no environment manager goes looking for torch on an index (a CUDA build, gigabytes)."""
    places = os.environ.get("PIP_FIND_LINKS", "").split()
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            places += value.strip("'\"").split()
    for place in dict.fromkeys(places):
        folder = Path(place.removeprefix("file://"))
        found = sorted(folder.glob(f"torch-{torch.__version__}-*.whl"))
        if found:
            return found[0]
    pytest.fail(
        f"no wheel of torch {torch.__version__} in pip's find-links {places}: building the "
        "served model's environment would download torch from an index; put the wheel there"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.tasks
@pytest.mark.timeout(2400)
def test_mlflow_models_serve_builds_the_environment_and_answers(
    tmp_path: Path, evaluated: tuple
) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    result = register(config, artifacts, evaluation, tmp_path / "registration.json")
    uri = result.model_uri
    store = config.tracking_uri
    assert store is not None
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)

    local, _ = fetch_logged_model(uri, tmp_path / "scratch")
    requirements = (local / "requirements.txt").read_text().split()
    wheel = requirements[0]
    assert wheel == f"{WHEELS}/transferkit-{transferkit.__version__}-py3-none-any.whl"
    assert (local / wheel).is_file()
    assert not [r for r in requirements if r.startswith("transferkit==")]
    frame = pd.DataFrame({"text": TEXTS})
    expected = mlflow.pyfunc.load_model(str(local)).predict(frame)

    # What pip may install: torch only as the local wheel (the constraint names its build).
    torch_wheel = local_torch_wheel()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    # Run from an empty folder, no PYTHONPATH: this checkout must not be importable from there.
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "PIP_FIND_LINKS": str(torch_wheel.parent),
        "PIP_CONSTRAINT": str(constraints),
        "PIP_NO_INPUT": "1",
        "MLFLOW_ENV_ROOT": str(tmp_path / "envs"),
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_REGISTRY_URI": store,
    }
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-r",
            "requirements.txt",
        ],
        cwd=local,
        env=env,
        check=True,
        timeout=600,
    )
    install = {
        i["metadata"]["name"].lower(): i["download_info"]["url"]
        for i in json.loads(report.read_text())["install"]
    }
    if install.get("torch") != torch_wheel.as_uri() or [
        n for n in install if n.startswith(("nvidia-", "triton"))
    ]:
        pytest.fail(f"torch would not come from {torch_wheel}: {install}; nothing installed")
    assert install["transferkit"] == (local / wheel).as_uri()

    # MLflow's virtualenv manager takes the model's Python from pyenv; it must not download one.
    python = yaml.safe_load((local / "python_env.yaml").read_text())["python"]
    pyenv = shutil.which("pyenv")
    if pyenv is None or subprocess.run([pyenv, "prefix", python], capture_output=True).returncode:
        pytest.fail(f"the virtualenv manager needs Python {python} installed by pyenv")

    cli = str(Path(sys.executable).with_name("mlflow"))
    started = time.monotonic()
    subprocess.run(
        [cli, "models", "prepare-env", "-m", uri, "--env-manager", "virtualenv"],
        env=env,
        cwd=workdir,
        check=True,
        timeout=1500,
    )
    built = time.monotonic() - started
    print(f"mlflow models prepare-env (virtualenv) built the environment in {built:.0f} s")
    (venv,) = (tmp_path / "envs").iterdir()
    probe = "import torch, transferkit; print(torch.__version__, transferkit.__file__)"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    torch_version, where = out.stdout.split()
    assert torch_version == torch.__version__
    assert Path(where).is_relative_to(venv)  # the logged wheel, installed, not this checkout

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [
            cli,
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "virtualenv",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        started = time.monotonic()
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() - started < 300, "the server did not answer /ping in 300 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        print(f"mlflow models serve answered /ping {time.monotonic() - started:.0f} s after start")
        body = json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            served = pd.DataFrame(json.loads(response.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(tmp_path / "envs", ignore_errors=True)  # about 2 GB

    assert list(served.columns) == list(expected.columns)
    assert served["label"].tolist() == expected["label"].tolist()
    assert served["label"].tolist()[:2] == ["positive", "negative"]
    numbers = [c for c in expected.columns if c != "label"]
    np.testing.assert_allclose(served[numbers].to_numpy(), expected[numbers].to_numpy(), atol=1e-6)
