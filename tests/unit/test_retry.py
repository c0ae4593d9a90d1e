"""Steps retry transient errors inside their process, and nothing else (transferkit.retry)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from tests.conftest import make_config
from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.data import ingest_data
from transferkit.errors import (
    BackboneError,
    ConfigError,
    DataError,
    StorageError,
    TrainingError,
    TransferkitError,
)
from transferkit.registry import _registry_error
from transferkit.retry import is_transient, retry_transient


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (client_error("SlowDown", 503), True),
        (client_error("InternalError", 500), True),
        (client_error("ServiceUnavailable", 503), True),
        (client_error("Throttling", 400), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("NoSuchKey", 404), False),
        (client_error("NoSuchBucket", 404), False),
        (client_error("AccessDenied", 403), False),
        (client_error("InvalidAccessKeyId", 403), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
        (ConnectionClosedError(endpoint_url="http://127.0.0.1:9"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
        (SSLError(endpoint_url="https://s3", error="certificate verify failed"), False),
        (NoCredentialsError(), False),
        (OSError(28, "No space left on device"), False),
    ],
)
def test_s3_errors_say_whether_they_are_transient(error: Exception, transient: bool) -> None:
    translated = storage._s3_error("s3://b/k", error)
    assert isinstance(translated, StorageError)
    assert translated.transient is transient
    assert is_transient(translated) is transient


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionError("Connection refused"), True),
        (MlflowException("Max retries exceeded with url: /api/2.0/mlflow/runs/create"), True),
        (MlflowException("boom", error_code=databricks_pb2.INTERNAL_ERROR), True),
        (MlflowException("busy", error_code=databricks_pb2.TEMPORARILY_UNAVAILABLE), True),
        (MlflowException("bad", error_code=databricks_pb2.INVALID_PARAMETER_VALUE), False),
        (MlflowException("no", error_code=databricks_pb2.PERMISSION_DENIED), False),
    ],
)
def test_registry_errors_say_whether_they_are_transient(
    error: Exception, transient: bool, sst2_config: PipelineConfig
) -> None:
    assert _registry_error(sst2_config, error).transient is transient


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConfigError("training.epochs: must be at least 1"), False),
        (DataError("train.tsv: training split has a single class ('1')"), False),
        (BackboneError("model.safetensors: sha256 does not match"), False),
        (TrainingError("loss diverged"), False),
        (StorageError("s3://b/k: no such object; check the key"), False),
        (StorageError("s3://b/k: S3 request failed; retry later", transient=True), True),
        (TimeoutError("timed out"), True),
        (ConnectionResetError("reset by peer"), True),
        (KeyError("label"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_errors_marked_transient_and_connection_errors_are_retried(
    error: Exception, transient: bool
) -> None:
    assert is_transient(error) is transient


def test_transient_flag_survives_pickling_between_processes() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(StorageError("s3://b/k: lost", transient=True)))
    assert isinstance(error, TransferkitError)
    assert error.transient is True
    assert str(error) == "s3://b/k: lost"


def test_a_deterministic_ingest_error_is_raised_on_the_first_attempt(tmp_path: Path) -> None:
    bad = tmp_path / "one-class.tsv"
    bad.write_text("sentence\tlabel\n" + "".join(f"text {i}\t1\n" for i in range(50)))
    config = make_config(tmp_path, {"uri": str(bad)})
    calls: list[int] = []
    waits: list[float] = []

    def ingest() -> object:
        calls.append(1)
        return ingest_data(config, tmp_path / "dataset")

    with pytest.raises(DataError, match="training split has a single class"):
        retry_transient("ingest_data", ingest, sleep=waits.append)
    assert len(calls) == 1
    assert waits == []
    assert not (tmp_path / "dataset").exists()


def test_an_unreachable_store_is_retried_with_backoff_then_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real connection refused (nothing listens on port 9): transient, three attempts."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    config = make_config(
        tmp_path,
        {"train_uri": "s3://bucket/train.tsv", "test_uri": "s3://bucket/dev.tsv"},
        storage={"s3_endpoint_url": "http://127.0.0.1:9", "retries": 0},
    )
    calls: list[int] = []
    waits: list[float] = []

    def ingest() -> object:
        calls.append(1)
        return ingest_data(config, tmp_path / "dataset")

    with (
        caplog.at_level(logging.WARNING, logger="transferkit.retry"),
        pytest.raises(StorageError, match="cannot reach the S3 endpoint") as caught,
    ):
        retry_transient("ingest_data", ingest, sleep=waits.append)
    assert caught.value.transient
    assert len(calls) == 3
    assert waits == [5.0, 10.0]
    retries = [r.getMessage() for r in caplog.records if r.name == "transferkit.retry"]
    assert len(retries) == 2
    assert retries[0].startswith("ingest_data: transient error, attempt 2 of 3 in 5 s: s3://")
    assert not (tmp_path / "dataset").exists()


def test_a_transient_error_that_clears_recovers_within_the_attempts() -> None:
    outcomes: list[Exception | str] = [
        StorageError("s3://b/k: S3 error SlowDown; retry or check the store", transient=True),
        ConnectionResetError("reset by peer"),
        "done",
    ]
    waits: list[float] = []

    def work() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert retry_transient("register_model", work, sleep=waits.append) == "done"
    assert outcomes == []
    assert waits == [5.0, 10.0]


def test_backoff_doubles_up_to_its_cap() -> None:
    waits: list[float] = []

    def always_lost() -> None:
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError):
        retry_transient("train", always_lost, attempts=6, max_delay=30, sleep=waits.append)
    assert waits == [5.0, 10.0, 20.0, 30.0, 30.0]
