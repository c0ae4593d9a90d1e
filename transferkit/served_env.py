"""The environment a registered model is served in: its requirements, and transferkit's own
core library as a wheel logged with the model (no index serves transferkit).

``mlflow models serve`` (its default virtualenv manager) installs the model's requirements.txt
from a copy of the model folder: the wheel's relative path there resolves. The wheel is built
from the running package's own ``.py`` files (editable or installed alike), without the KFP
wrappers, and declares no dependencies: requirements.txt pins those (to what trained the
model). tests/unit/test_served_requirements.py checks the list against the serving code's
imports and builds the environment for real.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

# What the served model's requirements name besides mlflow, torch and transferkit's own wheel:
# the distributions of the third-party modules the serving code (pyfunc_entry and what it
# imports, functions' imports included) imports, whatever the task or family. Not named: the
# ones only fetching, reading and storage import (openvino, boto3, huggingface_hub, httpx2);
# tests/unit/test_served_requirements.py checks the list against the code.
SERVED_DISTRIBUTIONS = (
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "PyYAML",
    "tqdm",
    "pillow",
)
# The folder in the logged model that holds transferkit's wheel (the name MLflow's
# add_libraries_to_model uses for the same purpose).
WHEELS = "wheels"
# transferkit subpackages the served model never imports: the KFP wrappers (they import kfp).
_NOT_SERVED = frozenset({"components", "pipelines"})
# Fixed, so that the same code gives the same wheel, byte for byte.
_WHEEL_TIME = (1980, 1, 1, 0, 0, 0)


def served_requirements(wheel: str) -> list[str]:
    """What serving the model needs, pinned to what trained it: transferkit itself from the
    wheel logged with the model (``wheel``, its file name; no index serves transferkit), and
    the third-party distributions its serving code imports."""
    from importlib.metadata import version

    import mlflow
    import torch

    return [
        f"{WHEELS}/{wheel}",
        # Without the local label (+cpu, +cu128): the build is the serving machine's choice.
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        *(f"{name}=={version(name)}" for name in SERVED_DISTRIBUTIONS),
    ]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_served_wheel(dest: Path) -> Path:
    """Write a wheel of the running transferkit's core library into ``dest``.

    Built from the imported package's own files, so it works for an editable install (the
    source tree) and a wheel in site-packages alike: every ``.py`` file under
    ``transferkit/`` except the KFP wrappers (``components``, ``pipelines``), no caches. Its
    metadata declares no dependencies: the model's requirements.txt pins those, so installing
    it pulls in none of the pipeline's (kfp, openvino, boto3 …).

    Returns:
        The wheel's path (``transferkit-VERSION-py3-none-any.whl``).
    """
    import zipfile

    import transferkit
    from transferkit import __version__

    root = Path(transferkit.__file__).parent
    sources = sorted(
        path
        for path in root.rglob("*.py")
        if path.relative_to(root).parts[0] not in _NOT_SERVED
        and "__pycache__" not in path.relative_to(root).parts
    )
    version = __version__.replace("-", "_")
    info = f"transferkit-{version}.dist-info"
    files: list[tuple[str, bytes]] = [
        (f"transferkit/{path.relative_to(root).as_posix()}", path.read_bytes()) for path in sources
    ]
    files.append(
        (
            f"{info}/METADATA",
            (
                "Metadata-Version: 2.1\nName: transferkit\n"
                f"Version: {__version__}\n"
                "Summary: transferkit's core library, as logged with a registered model "
                "(its dependencies: the model's requirements.txt)\n"
            ).encode(),
        )
    )
    files.append(
        (
            f"{info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: transferkit.registry\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        )
    )
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files)
    files.append((f"{info}/RECORD", (record + f"{info}/RECORD,,\n").encode()))
    wheel = dest / f"transferkit-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            entry = zipfile.ZipInfo(name, date_time=_WHEEL_TIME)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, data)
    return wheel
