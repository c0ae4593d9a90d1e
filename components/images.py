"""The container images the components run in (named in ``transferkit.containers``)."""

from transferkit.containers import CPU_IMAGE, CUDA_IMAGE, REGISTRY

__all__ = ["CPU_IMAGE", "CUDA_IMAGE", "REGISTRY"]
