"""KFP component: extract_features. Logic: transferkit.features.extract_features."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def extract_features(
    config: dict, dataset: Input[Dataset], backbone: Input[Model], features: Output[Dataset]
) -> None:
    """Embed every split with the frozen backbone (content-cached).

    Args:
        config: the parts of the run configuration this step reads
            (transferkit.step_inputs).
        dataset: output of ingest_data.
        backbone: output of fetch_backbone.
        features: one float32 matrix per split plus features.json.
    """
    from pathlib import Path

    from transferkit.features import extract_features as extract
    from transferkit.logs import configure_logging
    from transferkit.retry import retry_transient
    from transferkit.step_inputs import step_config

    configure_logging()
    settings = step_config(config, "extract_features")
    # With runtime.feature_cache on S3, the step reads and writes object storage.
    result = retry_transient(
        "extract_features",
        lambda: extract(settings, Path(dataset.path), Path(backbone.path), Path(features.path)),
    )
    features.metadata.update(
        {"key": result.key, "dim": result.dim, "cache_hit": result.cache_hit, "rows": result.rows}
    )
