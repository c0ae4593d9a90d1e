"""The one place that names the container images every component runs in.

Images are built from ``images/`` with the locked dependencies and tagged with the package
version, so a compiled pipeline always pins the code that compiled it.
"""

import hashlib
from pathlib import Path

from transferkit import __version__

REGISTRY = "ghcr.io/transferkit"
CPU_IMAGE = f"{REGISTRY}/transferkit-cpu:{__version__}"
CUDA_IMAGE = f"{REGISTRY}/transferkit-cuda:{__version__}"

# The label images/build.sh gives an image: the digest of the transferkit source it installed.
SOURCE_LABEL = "dev.transferkit.source"


def source_digest(package_dir: Path | None = None) -> str:
    """A digest of transferkit's Python files (the installed package's, by default).

    images/build.sh computes the same over the tree it builds the wheel from (``sha256sum``
    lines of ``transferkit/**.py`` in byte order, hashed, 16 hex digits) and labels the image
    with it, so that a local run in containers can tell an image that holds other code.
    """
    package_dir = Path(__file__).resolve().parent if package_dir is None else package_dir
    files = sorted(
        f"{package_dir.name}/{path.relative_to(package_dir).as_posix()}"
        for path in package_dir.rglob("*.py")
        if "__pycache__" not in path.parts and path.is_file()
    )
    listing = "".join(
        f"{hashlib.sha256((package_dir.parent / name).read_bytes()).hexdigest()}  {name}\n"
        for name in files
    )
    return hashlib.sha256(listing.encode()).hexdigest()[:16]
