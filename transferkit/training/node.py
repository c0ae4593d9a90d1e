"""The training entry point of one node of a multi-node TrainJob.

    python -m transferkit.training.node --config-json JSON --dataset URI --backbone URI \
        --features URI --output URI

Every node downloads the step's inputs (the KFP artifacts of ingest_data, fetch_backbone and
extract_features, by URI), trains with ``transferkit.training.train`` — whose data-parallel
processes join the job-wide group from the PET_* variables of the Kubeflow Trainer torch
runtime (``transferkit.training.distributed.Layout``) — and the first node uploads the model
folder to ``--output`` with a completion marker. The launching step (``run_train_job``)
then copies it into its KFP output artifact.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.errors import TransferkitError
from transferkit.step_inputs import step_config
from transferkit.training.distributed import Layout

log = logging.getLogger(__name__)


def run_node(
    config: PipelineConfig,
    layout: Layout,
    dataset: str,
    backbone: str,
    features: str,
    output: str,
) -> bool:
    """Train this node's share; the main node uploads the model. Returns whether it did.

    Raises:
        TransferkitError: an input cannot be read, training failed, or the upload failed.
    """
    from transferkit.training import train

    with tempfile.TemporaryDirectory(prefix="transferkit-node-") as scratch:
        root = Path(scratch)
        local = {}
        for name, uri in (("dataset", dataset), ("backbone", backbone), ("features", features)):
            local[name] = root / name
            storage.fetch_tree(uri, local[name], storage.list_tree(uri, config.storage))
        train(
            config, local["dataset"], local["backbone"], local["features"], root / "model", layout
        )
        if not layout.main:
            log.info("node %d of %d done; node 0 uploads the model", layout.node_rank, layout.nodes)
            return False
        storage.upload_tree(root / "model", output, config.storage)
    log.info("uploaded the model to %s", output)
    return True


def main(argv: list[str] | None = None) -> int:
    from transferkit.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m transferkit.training.node")
    parser.add_argument("--config-json", required=True)
    for name in ("dataset", "backbone", "features", "output"):
        parser.add_argument(f"--{name}", required=True, metavar="URI")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = step_config(json.loads(args.config_json), "train")
        layout = Layout.from_env(os.environ)  # set by the TrainJob's torch runtime
        run_node(config, layout, args.dataset, args.backbone, args.features, args.output)
    except TransferkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
