"""The one place that names the container images every component runs in.

Images are built from ``images/`` with the locked dependencies and tagged with the package
version, so a compiled pipeline always pins the code that compiled it.
"""

from transferkit import __version__

REGISTRY = "ghcr.io/transferkit"
CPU_IMAGE = f"{REGISTRY}/transferkit-cpu:{__version__}"
CUDA_IMAGE = f"{REGISTRY}/transferkit-cuda:{__version__}"
