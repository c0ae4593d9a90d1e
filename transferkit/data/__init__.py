"""Target datasets: readers, validation, splits and the dataset artifact."""

from transferkit.data.dataset import (
    SPLITS,
    LabelMap,
    dataset_modality,
    load_images,
    load_inputs,
    load_label_map,
    load_labels,
    load_split,
)
from transferkit.data.ingest import IngestResult, ingest_data

__all__ = [
    "SPLITS",
    "IngestResult",
    "LabelMap",
    "dataset_modality",
    "ingest_data",
    "load_images",
    "load_inputs",
    "load_label_map",
    "load_labels",
    "load_split",
]
