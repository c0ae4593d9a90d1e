"""Target datasets: readers, validation, splits and the dataset artifact."""

from transferkit.data.dataset import SPLITS, LabelMap, load_label_map, load_split
from transferkit.data.ingest import IngestResult, ingest_data

__all__ = ["SPLITS", "IngestResult", "LabelMap", "ingest_data", "load_label_map", "load_split"]
