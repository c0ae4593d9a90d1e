"""register_model against a real MLflow store (SQLite): versions, aliases, failure safety."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import biased_model
from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.errors import RegistryError
from transferkit.registry import (
    LOCK_HEARTBEAT,
    LOCK_HOLDER,
    LOCK_SUFFIX,
    promotion_lock,
    redact,
    register_model,
)


def with_store(config: PipelineConfig, tmp_path: Path) -> PipelineConfig:
    data = config.model_dump()
    data["runtime"]["work_dir"] = str(tmp_path)
    data["registry"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return PipelineConfig.model_validate(data)


def register(
    config: PipelineConfig,
    artifacts: Path,
    evaluation: Path,
    out: Path,
    run_id: str = "run-1",
    model: Path | None = None,
):
    return register_model(
        config,
        artifacts / "dataset",
        artifacts / "backbone",
        model or artifacts / "model",
        evaluation,
        run_id,
        out,
    )


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory, evaluated: tuple) -> tuple[Path, Path]:
    """A real, worse rival: the probe with its head pushed towards 'negative', evaluated."""
    config, artifacts, _ = evaluated
    return biased_model(config, artifacts, tmp_path_factory.mktemp("biased"), 2.0)


def relabelled(model: Path, target: Path) -> Path:
    """The same model under other label names: not comparable with the rest."""
    shutil.copytree(model, target)
    card = storage.read_json(target / "transferkit.json")
    card["labels"] = ["neg", "pos"]
    storage.write_json(target / "transferkit.json", card)
    return target


def test_registers_logs_and_serves(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    result = register(config, artifacts, evaluation, tmp_path / "registration.json")
    assert (result.version, result.champion, result.reused) == ("1", True, False)
    assert result.reason == "no champion yet"
    assert result.model_uri == "models:/sst2-test/1"
    assert storage.read_json(tmp_path / "registration.json")["model_uri"] == result.model_uri

    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    version = client.get_model_version_by_alias("sst2-test", "champion")
    assert str(version.version) == "1"
    assert str(client.get_model_version_by_alias("sst2-test", "challenger").version) == "1"
    assert version.tags["transferkit.strategy"] == "linear_probe"
    assert version.tags["transferkit.pipeline_run_id"] == "run-1"
    assert len(version.tags["transferkit.data_fingerprint"]) == 64
    run = client.get_run(result.run_id)
    assert run.data.params["strategy.name"] == "linear_probe"
    assert run.data.params["data.text_column"] == "sentence"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    artifacts_logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"evaluation", "data", "config.yaml"} <= artifacts_logged
    logged = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/confusion_matrix.png"} <= logged

    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)  # the registry URI is a separate global
    model = mlflow.pyfunc.load_model("models:/sst2-test@champion")
    assert model.metadata.signature.inputs.input_names() == ["text"]
    predictions = model.predict(
        pd.DataFrame({"text": ["a wonderful, moving film", "a dull, lifeless mess"]})
    )
    assert predictions["label"].tolist() == ["positive", "negative"]
    assert list(predictions.columns) == ["label", "score", "p_negative", "p_positive"]
    assert ((predictions["score"] > 0.5) & (predictions["score"] <= 1)).all()


def test_identical_model_reuses_its_version(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    first = register(config, artifacts, evaluation, tmp_path / "r1.json")
    again = register(config, artifacts, evaluation, tmp_path / "r2.json", run_id="run-2")
    assert again.reused
    assert again.version == first.version == "1"
    assert again.champion
    assert again.reason == "already the champion"
    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    assert len(client.search_model_versions("name = 'sst2-test'")) == 1


def test_the_same_weights_retrained_reuse_their_version_other_weights_do_not(
    tmp_path: Path, evaluated: tuple, probe_run: tuple
) -> None:
    """The model fingerprint covers what the model computes, not how long it took."""
    from transferkit.training import train

    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    first = register(config, artifacts, evaluation, tmp_path / "r1.json")
    # Retrained for real with the same seed: the same weights, other wall-clock seconds.
    retrained = tmp_path / "retrained"
    train(config, artifacts / "dataset", artifacts / "backbone", artifacts / "features", retrained)
    before = storage.read_json(artifacts / "model" / "training.json")
    record = storage.read_json(retrained / "training.json")
    assert (retrained / "head.safetensors").read_bytes() == (
        artifacts / "model" / "head.safetensors"
    ).read_bytes()
    # Timings and provenance differ as they would on another node and another day.
    record["seconds"] = before["seconds"] + 12.5
    storage.write_json(retrained / "training.json", record)
    card = storage.read_json(retrained / "transferkit.json")
    card["environment"] = {**card["environment"], "torch_threads": "64", "device": "cuda"}
    storage.write_json(retrained / "transferkit.json", card)
    assert record != before
    # ... and from sources whose stamp changed (the same bytes): the trigger then sees the
    # reused champion as trained on them.
    dataset = Path(shutil.copytree(artifacts / "dataset", tmp_path / "dataset"))
    stats = storage.read_json(dataset / "stats.json")
    stats["source_stamp"] = "re-uploaded"
    storage.write_json(dataset / "stats.json", stats)
    again = register_model(
        config,
        dataset,
        artifacts / "backbone",
        retrained,
        evaluation,
        "run-2",
        tmp_path / "r2.json",
    )
    assert (again.reused, again.version) == (True, first.version)
    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'sst2-test'")] == ["1"]
    assert client.get_model_version("sst2-test", "1").tags["transferkit.data_stamp"] == (
        "re-uploaded"
    )

    # One weight changed: another model, another version.
    from safetensors.torch import load_file, save_file

    head = load_file(str(retrained / "head.safetensors"))
    head["weight"][0, 0] += 1e-3
    save_file(head, str(retrained / "head.safetensors"))
    other = register(config, artifacts, evaluation, tmp_path / "r3.json", "run-3", retrained)
    assert (other.reused, other.version) == (False, "2")
    # So do the labels it serves, even with the same weights.
    relabelled_model = relabelled(artifacts / "model", tmp_path / "relabelled")
    renamed = register(
        config, artifacts, evaluation, tmp_path / "r4.json", "run-4", relabelled_model
    )
    assert (renamed.reused, renamed.version) == (False, "3")


def test_champion_moves_only_to_a_significantly_better_model(
    tmp_path: Path, evaluated: tuple, biased: tuple[Path, Path]
) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    worse_model, worse_eval = biased
    first = register(config, artifacts, worse_eval, tmp_path / "r1.json", model=worse_model)
    assert (first.version, first.champion, first.comparison) == ("1", True, None)

    better = register(config, artifacts, evaluation, tmp_path / "r2.json")
    assert (better.version, better.champion, better.previous_champion) == ("2", True, "1")
    comparison = better.comparison
    assert comparison is not None
    assert comparison.method == "mcnemar"
    assert comparison.rows == 300
    # The champion was re-scored on this run's rows exactly as evaluate scored it.
    worse_accuracy = storage.read_json(worse_eval / "evaluation.json")["scores"]["accuracy"]
    assert comparison.champion == pytest.approx(worse_accuracy)
    assert comparison.challenger == pytest.approx(better.metrics["test_accuracy"])
    assert comparison.gain > 0
    assert comparison.p_value < 0.05
    assert comparison.ci_low > 0
    assert "mcnemar p=" in better.reason
    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    assert str(client.get_model_version_by_alias("sst2-test", "champion").version) == "2"
    run = client.get_run(better.run_id)
    assert run.data.metrics["gate_p_value"] == pytest.approx(comparison.p_value)
    assert run.data.metrics["champion_accuracy_same_rows"] == pytest.approx(worse_accuracy)
    assert run.data.tags["transferkit.gate_decision"].startswith("promoted: accuracy ")

    again = register(config, artifacts, worse_eval, tmp_path / "r3.json", model=worse_model)
    assert again.reused
    assert (again.version, again.champion) == ("1", False)
    assert again.reason.endswith("needs a gain > 0")
    assert str(client.get_model_version_by_alias("sst2-test", "champion").version) == "2"


def test_min_improvement_and_promote_switch(
    tmp_path: Path, evaluated: tuple, biased: tuple[Path, Path]
) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    register(config, artifacts, biased[1], tmp_path / "r1.json", model=biased[0])
    strict = config.model_copy(deep=True)
    strict.registry.min_improvement = 0.5
    held = register(strict, artifacts, evaluation, tmp_path / "r2.json")
    assert not held.champion
    assert held.reason.endswith("needs a gain > 0.5")
    frozen = config.model_copy(deep=True)
    frozen.registry.promote = False
    off = register(frozen, artifacts, evaluation, tmp_path / "r3.json")
    assert not off.champion
    assert off.reason.endswith("registry.promote is off")


def test_bootstrap_gate(tmp_path: Path, evaluated: tuple, biased: tuple[Path, Path]) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    config.registry.gate = "bootstrap"
    config.registry.bootstrap_samples = 300
    register(config, artifacts, biased[1], tmp_path / "r1.json", model=biased[0])
    better = register(config, artifacts, evaluation, tmp_path / "r2.json")
    assert better.champion
    assert better.comparison is not None
    assert better.comparison.method == "bootstrap"
    assert better.comparison.ci_low <= better.comparison.gain <= better.comparison.ci_high


def test_champion_with_other_labels_is_not_comparable(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    other = relabelled(artifacts / "model", tmp_path / "relabelled")
    register(config, artifacts, evaluation, tmp_path / "r1.json", model=other)
    held = register(config, artifacts, evaluation, tmp_path / "r2.json")
    assert not held.champion
    assert held.reason.startswith(
        "champion v1 predicts ['neg', 'pos'], this model ['negative', 'positive']"
    )


def test_failure_mid_registration_leaves_no_version(tmp_path: Path, evaluated: tuple) -> None:
    """The report artifact vanished after evaluation: nothing may stay registered."""
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    broken = tmp_path / "broken-eval"
    shutil.copytree(evaluation, broken)
    (broken / "confusion_matrix.png").unlink()
    with pytest.raises(FileNotFoundError):
        register(config, artifacts, broken, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    assert client.search_model_versions("name = 'sst2-test'") == []
    runs = client.search_runs([client.get_experiment_by_name("transferkit").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_unreachable_server_is_a_one_line_registry_error(tmp_path: Path, evaluated: tuple) -> None:
    config, artifacts, evaluation = evaluated
    data = config.model_dump()
    data["registry"]["tracking_uri"] = "http://127.0.0.1:9"
    data["registry"]["http_retries"] = 0
    config = PipelineConfig.model_validate(data)
    with pytest.raises(RegistryError) as info:
        register(config, artifacts, evaluation, tmp_path / "r.json")
    message = str(info.value)
    assert message.startswith("MLflow at http://127.0.0.1:9 is unreachable after 1 attempt;")
    assert "\n" not in message
    assert info.value.transient  # the step runs its work again (transferkit.retry)
    assert not (tmp_path / "r.json").exists()


def test_redact() -> None:
    assert redact("https://u:p@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert redact("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_promotion_lock_takes_turns_and_breaks_an_abandoned_lock(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with promotion_lock(client, "m", "run-a", timeout=60):
        tags = client.get_registered_model("m" + LOCK_SUFFIX).tags
        assert tags["transferkit.lock_holder"] == "run-a"
        assert tags["transferkit.lock_heartbeat"].startswith("0 ")
        with (
            pytest.raises(RegistryError) as caught,
            promotion_lock(client, "m", "run-b", 0.5, 3600),
        ):
            pass
        message = str(caught.value)
        assert message.startswith("registered model 'm' is being promoted by run-a for ")
        assert "delete the registered model 'm.transferkit-lock'" in message
    # Released: the next one gets it at once.
    with promotion_lock(client, "m", "run-b", timeout=60):
        pass
    assert client.search_registered_models() == []
    # A lock an attempt of this very run left (the server died under it): its retry, with
    # the same run id, takes it over at once instead of waiting for it to lapse.
    client.create_registered_model("m" + LOCK_SUFFIX, tags={"transferkit.lock_holder": "run-d"})
    with promotion_lock(client, "m", "run-d", timeout=0.5, abandoned_after=3600):
        pass
    assert client.search_registered_models() == []
    # A lock whose holder died is broken once it is older than the timeout.
    client.create_registered_model("m" + LOCK_SUFFIX, tags={"transferkit.lock_holder": "dead"})
    time.sleep(1.2)
    with promotion_lock(client, "m", "run-c", timeout=60, abandoned_after=1):
        holder = client.get_registered_model("m" + LOCK_SUFFIX).tags["transferkit.lock_holder"]
        assert holder == "run-c"


class LogLines(logging.Handler):
    """The registry's log lines, whatever handlers the CLI configured before."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def registry_log() -> Iterator[list[str]]:
    handler = LogLines()
    logger = logging.getLogger("transferkit.registry")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def beating(client: MlflowClient, lock: str, stop: threading.Event, skew: float) -> None:
    """A live holder's heartbeat, written by a host whose clock is ``skew`` seconds off."""
    beat = 0
    while not stop.wait(0.3):
        beat += 1
        client.set_registered_model_tag(lock, LOCK_HEARTBEAT, f"{beat} {time.time() + skew:.3f}")


def test_a_lock_whose_heartbeat_stopped_is_broken_within_the_lease_a_live_one_is_not(
    tmp_path: Path, registry_log: list[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    lock = "m" + LOCK_SUFFIX
    # A holder killed with SIGKILL: its heartbeat never moves again. The waiter breaks the
    # lock after the lease by its own clock, however young the lock looks.
    client.create_registered_model(lock, tags={LOCK_HOLDER: "killed", LOCK_HEARTBEAT: "7 1.0"})
    started = time.monotonic()
    with promotion_lock(client, "m", "next", timeout=60, lease=2) as held:
        waited = time.monotonic() - started
        assert client.get_registered_model(lock).tags[LOCK_HOLDER] == "next"
        assert held.broken == ["killed"]
    assert 2 <= waited < 60  # the lease, not the timeout
    [line] = [x for x in registry_log if x.startswith("breaking")]
    assert line.startswith(
        "breaking the promotion lock of m held by killed: its heartbeat stopped: unchanged for 2."
    ), line
    assert line.endswith(" s (registry.lock_lease 2 s)")
    assert client.search_registered_models() == []

    # A live holder on a host whose clock is an hour behind (or ahead): its heartbeat
    # changes, so it is waited for up to the timeout and never broken, whatever its stamps.
    for skew in (-3600.0, 3600.0):
        client.create_registered_model(lock, tags={LOCK_HOLDER: "alive", LOCK_HEARTBEAT: "0 0"})
        stop = threading.Event()
        thread = threading.Thread(target=beating, args=(client, lock, stop, skew))
        thread.start()
        try:
            with (
                pytest.raises(RegistryError, match="is being promoted by alive"),
                promotion_lock(client, "m", "waiter", timeout=4, lease=2),
            ):
                pass
        finally:
            stop.set()
            thread.join()
        assert client.get_registered_model(lock).tags[LOCK_HOLDER] == "alive"
        client.delete_registered_model(lock)
    assert not [x for x in registry_log if x.startswith("breaking")][1:]


def test_the_holder_beats_and_learns_when_its_lock_was_broken(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    lock = "m" + LOCK_SUFFIX
    with promotion_lock(client, "m", "holder", timeout=60, lease=2) as held:
        first = client.get_registered_model(lock).tags[LOCK_HEARTBEAT]
        deadline = time.monotonic() + 30
        while client.get_registered_model(lock).tags[LOCK_HEARTBEAT] == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.1)
        held.check()  # still its own
        # Broken by a waiter that took it for dead, and taken by another run.
        client.delete_registered_model(lock)
        client.create_registered_model(lock, tags={LOCK_HOLDER: "other"})
        while held.lost is None:
            assert time.monotonic() < deadline, "the loss went unnoticed"
            time.sleep(0.1)
        with pytest.raises(RegistryError) as caught:
            held.check()
        assert str(caught.value).startswith(
            "the promotion lock m.transferkit-lock was lost: it was broken and is now held by other"
        )
        # Its heartbeat is not written on the other run's lock.
        assert LOCK_HEARTBEAT not in client.get_registered_model(lock).tags
