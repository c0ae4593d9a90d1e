"""Data-parallel fine-tuning (DDP) with 2 gloo processes on the CPU, against one process.

The multi-node TrainJob runs through the launcher's real ``kubernetes`` client against the
stand-in API server (tests/stand_ins/kube_apiserver.py), with the stand-in Trainer controller
(tests/stand_ins/trainjobs.py) running its nodes as local processes: no cluster here.

Without dropout the two runs see the same global batches and apply the same averaged
gradients, so they must end at the same weights and metrics up to float summation order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_config, save_tiny_bert
from tests.stand_ins.kube_apiserver import (
    KubeApiStandIn,
    serve_kube_api,
    use_kubeconfig,
    write_kubeconfig,
)
from tests.stand_ins.trainjobs import StandInTrainJobs
from transferkit.backbones import fetch_backbone
from transferkit.config import PipelineConfig
from transferkit.data import ingest_data
from transferkit.errors import TrainingError
from transferkit.features import extract_features
from transferkit.training import train
from transferkit.training.trainjob import run_train_job


@pytest.fixture(scope="module")
def deterministic_run(
    tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, sst2_small: dict[str, Path]
) -> tuple[Path, dict]:
    """A tiny BERT without dropout (so shards cannot differ by their masks), data, features."""
    tmp = tmp_path_factory.mktemp("ddp")
    backbone = save_tiny_bert(
        tmp / "tiny-no-dropout",
        minilm_dir,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    sections = {
        "data": {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "max_rows": 256,
        },
        "backbone": {"uri": str(backbone), "max_length": 32},
    }
    config = make_config(tmp, sections["data"], backbone=sections["backbone"])
    ingest_data(config, tmp / "dataset")
    fetch_backbone(config, tmp / "backbone")
    extract_features(config, tmp / "dataset", tmp / "backbone", tmp / "features")
    return tmp, sections


def config_for(run: tuple[Path, dict], **training: object) -> PipelineConfig:
    tmp, sections = run
    return make_config(
        tmp,
        sections["data"],
        backbone=sections["backbone"],
        strategy={"name": "full_finetune", "head_init": "random"},
        training={
            "epochs": 2,
            "batch_size": 16,
            "learning_rate": 1e-3,
            "precision": "fp32",
            "early_stopping_patience": 0,
            **training,
        },
    )


def fit(run: tuple[Path, dict], name: str, **training: object) -> tuple:
    tmp = run[0]
    config = config_for(run, **training)
    result = train(config, tmp / "dataset", tmp / "backbone", tmp / "features", tmp / name)
    return result, load_file(str(tmp / name / "encoder" / "model.safetensors"))


@pytest.mark.timeout(300)  # a teardown deadlock once hung this for the whole suite timeout
def test_two_gloo_processes_match_one_process(deterministic_run: tuple) -> None:
    single, single_weights = fit(deterministic_run, "single", processes=1)
    parallel, parallel_weights = fit(deterministic_run, "ddp", processes=2)
    assert parallel.details["steps"] == single.details["steps"]
    assert parallel.details["epochs_run"] == single.details["epochs_run"]
    for a, b in zip(single.details["validations"], parallel.details["validations"], strict=True):
        assert a["step"] == b["step"]
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1 / 100)  # ≤ 1 row in ~100
    assert single_weights.keys() == parallel_weights.keys()
    initial = load_file(str(deterministic_run[0] / "backbone" / "model" / "model.safetensors"))
    for key, value in single_weights.items():
        # Trained weights moved, and both runs moved them to the same place.
        assert torch.allclose(value, parallel_weights[key], atol=1e-4), key  # measured: 2.4e-6
    moved = [
        k for k in single_weights if k in initial and not torch.equal(initial[k], single_weights[k])
    ]
    assert moved


def test_a_batch_smaller_than_the_processes_is_refused(deterministic_run: tuple) -> None:
    with pytest.raises(TrainingError, match=r"batch_size 1 is smaller than the 2 training"):
        fit(deterministic_run, "too-small", processes=2, batch_size=1)


@pytest.fixture
def kube_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeApiStandIn]:
    """The stand-in API server with the stand-in controller, and a kubeconfig for it."""
    with serve_kube_api(KubeApiStandIn(controller=StandInTrainJobs())) as state:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", state.url, state.token)
        use_kubeconfig(monkeypatch, kubeconfig)
        yield state


def nodes_job(
    run: tuple[Path, dict], kube_api: KubeApiStandIn, name: str, **training: object
) -> tuple[Path, dict]:
    """run_train_job with 2 nodes of 1 process each, as the train_nodes component calls it
    (no API object: the real client, from the kubeconfig); the nodes run by the stand-in."""
    tmp = run[0]
    out = tmp / name
    run_train_job(
        config_for(run, nodes=2, processes=1, **training),
        {
            "dataset": str(tmp / "dataset"),
            "backbone": str(tmp / "backbone"),
            "features": str(tmp / "features"),
        },
        str(tmp / "kfp" / name),
        out,
        "transferkit",
        ("launcher-pod", "uid-1"),
        sleep=lambda _: time.sleep(0.2),
    )
    (create,) = kube_api.sent("POST")
    return out, create.body


@pytest.mark.timeout(600)
def test_two_nodes_of_a_train_job_match_one_process(
    deterministic_run: tuple, kube_api: KubeApiStandIn
) -> None:
    single, single_weights = fit(deterministic_run, "single-for-nodes", processes=1)
    out, job = nodes_job(deterministic_run, kube_api, "two-nodes")
    assert job["spec"]["trainer"]["numNodes"] == 2
    (stored,) = kube_api.objects.values()  # polled until the controller reported it Complete
    assert stored["status"] == {"conditions": [{"type": "Complete", "status": "True"}]}
    assert job["spec"]["trainer"]["command"] == ["python", "-m", "transferkit.training.node"]
    training = json.loads((out / "training.json").read_text())
    assert training["details"]["steps"] == single.details["steps"]
    weights = load_file(str(out / "encoder" / "model.safetensors"))
    assert weights.keys() == single_weights.keys()
    for key, value in single_weights.items():
        assert torch.allclose(value, weights[key], atol=1e-4), key
    # Only the first node uploaded, and the marker closed the upload.
    assert sorted(p.name for p in (deterministic_run[0] / "kfp").iterdir()) == ["two-nodes-nodes"]
    assert (deterministic_run[0] / "kfp" / "two-nodes-nodes" / "_SUCCESS").exists()


@pytest.mark.timeout(300)
def test_a_failed_train_job_fails_the_step_and_writes_no_model(
    deterministic_run: tuple, kube_api: KubeApiStandIn
) -> None:
    with pytest.raises(
        TrainingError,
        match=r"TrainJob transferkit/transferkit-\w+ failed: "
        r"TrainerFailed: error: training.batch_size 1 is smaller than the 2",
    ):
        nodes_job(deterministic_run, kube_api, "failing", batch_size=1)
    assert not (deterministic_run[0] / "failing").exists()
