"""Process-level settings for torch work: threads, seeds, the device, library versions."""

from __future__ import annotations

import platform
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from transferkit.devices import device

if TYPE_CHECKING:
    from transferkit.config import PipelineConfig


def configure_torch(config: PipelineConfig) -> None:
    """Apply ``runtime.num_threads`` (when set) to torch's CPU thread pool."""
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so splits, shuffles and initialisation repeat."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def environment(seed: int) -> dict[str, str]:
    """Seed, determinism settings, library versions and hardware recorded with every model."""
    from importlib.metadata import version

    from transferkit import __version__

    return {
        "transferkit": __version__,
        "torch": torch.__version__,
        # The installed version, read without importing transformers (about 1 s): a linear
        # probe's training step never needs the library itself.
        "transformers": version("transformers"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(device()),
        "torch_threads": str(torch.get_num_threads()),
        "seed": str(seed),
        "deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()),
        "cudnn_deterministic": str(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": str(torch.backends.cudnn.benchmark),
    }
