"""KFP components: one thin wrapper per step of the transfer-learning DAG."""

from transferkit.components.evaluate import evaluate
from transferkit.components.extract_features import extract_features
from transferkit.components.fetch_backbone import fetch_backbone
from transferkit.components.ingest_data import ingest_data
from transferkit.components.register_model import register_model
from transferkit.components.train import train

__all__ = [
    "evaluate",
    "extract_features",
    "fetch_backbone",
    "ingest_data",
    "register_model",
    "train",
]
