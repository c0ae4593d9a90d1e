"""Target datasets: readers, validation, splits and the dataset artifact."""

from transferkit.data.dataset import (
    SCORE,
    SPLITS,
    LabelMap,
    TextPairs,
    load_images,
    load_label_map,
    load_label_sets,
    load_labels,
    load_split,
)
from transferkit.data.ingest import IngestResult, ingest_data

__all__ = [
    "SCORE",
    "SPLITS",
    "IngestResult",
    "LabelMap",
    "TextPairs",
    "ingest_data",
    "load_images",
    "load_label_map",
    "load_label_sets",
    "load_labels",
    "load_split",
]
