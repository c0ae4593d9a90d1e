"""KFP components: one thin wrapper per step of the transfer-learning DAG."""

from transferkit.components.close_run import close_run
from transferkit.components.compare_strategies import compare_strategies
from transferkit.components.evaluate import evaluate
from transferkit.components.extract_features import extract_features
from transferkit.components.fetch_backbone import fetch_backbone
from transferkit.components.ingest_data import ingest_data
from transferkit.components.open_run import open_run
from transferkit.components.plan_sweep import plan_sweep
from transferkit.components.register_model import register_model
from transferkit.components.train import train, train_cuda, train_nodes

__all__ = [
    "close_run",
    "compare_strategies",
    "evaluate",
    "extract_features",
    "fetch_backbone",
    "ingest_data",
    "open_run",
    "plan_sweep",
    "register_model",
    "train",
    "train_cuda",
    "train_nodes",
]
