"""Pre-trained backbones: resolving, integrity checks, loading."""

from transferkit.backbones.fetch import BackboneInfo, fetch_backbone, load_backbone_info

__all__ = ["BackboneInfo", "fetch_backbone", "load_backbone_info"]
