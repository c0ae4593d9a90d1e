"""KFP component: fetch_backbone. Logic: transferkit.backbones.fetch_backbone."""

from kfp import dsl
from kfp.dsl import Model, Output
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fetch_backbone(config: dict, source_stamp: str, backbone: Output[Model]) -> None:
    """Copy the pre-trained backbone into the pipeline, checking its weights.

    Args:
        config: the run configuration (transferkit.config.PipelineConfig as a dict).
        source_stamp: content stamp of the backbone source, so a changed model misses the cache.
        backbone: the Hugging Face folder plus backbone.json (hashes, architecture, size).
    """
    from pathlib import Path

    from transferkit import config as cfg
    from transferkit.backbones import fetch_backbone as fetch
    from transferkit.cli import configure_logging

    configure_logging()
    info = fetch(cfg.PipelineConfig.model_validate(config), Path(backbone.path))
    backbone.metadata.update(
        {
            "fingerprint": info.fingerprint,
            "architecture": info.architecture,
            "parameters": info.parameters,
            "source": info.source,
        }
    )
