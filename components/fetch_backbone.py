"""KFP component: fetch_backbone. Logic: transferkit.backbones.fetch_backbone."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fetch_backbone(
    config: dict, source_stamp: str, dataset: Input[Dataset], backbone: Output[Model]
) -> None:
    """Copy the pre-trained backbone into the pipeline, checking its weights; with
    backbone_selection, rank the candidates by LogME on the training data and keep the best.

    Args:
        config: the parts of the run configuration this step reads
            (transferkit.step_inputs).
        source_stamp: content stamp of the backbone source(s), so a changed model misses the
            cache.
        dataset: output of ingest_data (read only to rank candidates).
        backbone: the Hugging Face folder plus backbone.json (hashes, architecture, size)
            and, when ranked, ranking.json.
    """
    import os
    from pathlib import Path

    from transferkit.backbones import fetch_backbone as fetch
    from transferkit.logs import configure_logging
    from transferkit.retry import retry_transient
    from transferkit.step_inputs import step_config
    from transferkit.storage import CACHE_ENV

    configure_logging()
    settings = step_config(config, "fetch_backbone")
    cache = os.environ.get(CACHE_ENV)  # the PVC mount that kubernetes.backbone_cache_pvc adds
    info = retry_transient(
        "fetch_backbone",
        lambda: fetch(
            settings, Path(backbone.path), Path(dataset.path), Path(cache) if cache else None
        ),
    )
    backbone.metadata.update(
        {
            "fingerprint": info.fingerprint,
            "architecture": info.architecture,
            "parameters": info.parameters,
            "source": info.source,
        }
    )
