"""Pre-trained backbones: one module per model family behind one protocol (``base``),
resolving and fetching them (``fetch``), their inputs (``modality``) and which strategies
apply to each (``support``).

The package itself imports nothing heavy: ``from transferkit.backbones import fetch_backbone``
loads the fetch module on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BackboneInfo", "fetch_backbone", "load_backbone_info"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from transferkit.backbones import fetch

        return getattr(fetch, name)
    raise AttributeError(name)
