"""Target datasets: readers, validation, splits and the dataset artifact."""

from transferkit.data.dataset import (
    SPLITS,
    LabelMap,
    load_images,
    load_label_map,
    load_label_sets,
    load_labels,
    load_split,
)
from transferkit.data.ingest import IngestResult, ingest_data

__all__ = [
    "SPLITS",
    "IngestResult",
    "LabelMap",
    "ingest_data",
    "load_images",
    "load_label_map",
    "load_label_sets",
    "load_labels",
    "load_split",
]
