"""Where and at which precision models run: the device, native bf16, autocast."""

from __future__ import annotations

from typing import Any

import torch


def device() -> torch.device:
    """The training device: the first CUDA device when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device | None = None) -> bool:
    """Whether bf16 matrix work runs natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(setting: str, device: torch.device | None = None) -> str:
    """'auto' → 'bf16' where supported, else 'fp32'; explicit settings pass through."""
    if setting == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return setting


def autocast(precision: str, device: torch.device | None = None) -> Any:
    """An autocast context for ``precision`` ('bf16' or 'fp32': disabled)."""
    device = device or torch.device("cpu")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
