"""KFP component: ingest_data. Logic: transferkit.data.ingest_data."""

from kfp import dsl
from kfp.dsl import Dataset, Output
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest_data(config: dict, source_stamp: str, dataset: Output[Dataset]) -> None:
    """Read, validate and split the labelled target data into parquet splits.

    Args:
        config: the parts of the run configuration this step reads
            (transferkit.step_inputs).
        source_stamp: content stamp of the data sources, so a changed file misses the cache.
        dataset: train/validation/test parquet, label map and stats.
    """
    from pathlib import Path

    from transferkit.data import ingest_data as ingest
    from transferkit.logs import configure_logging
    from transferkit.retry import retry_transient
    from transferkit.step_inputs import step_config

    configure_logging()
    settings = step_config(config, "ingest_data")
    result = retry_transient("ingest_data", lambda: ingest(settings, Path(dataset.path)))
    dataset.metadata.update(
        {
            "fingerprint": result.fingerprint,
            "rows": result.rows,
            "labels": result.labels,
            "source_stamp": source_stamp,
        }
    )
