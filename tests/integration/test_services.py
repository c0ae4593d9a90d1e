"""The pipeline against real services: data and backbone on a real S3 server (SeaweedFS), a
real ``mlflow server`` tracking over HTTP with its artifacts in that S3 store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from tests.integration.conftest import MlflowServer, S3Server, sst2_on_s3
from transferkit.cli import main

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
        "registry": {"tracking_uri": tracking.url, "model_name": model_name},
        "storage": {"s3_endpoint_url": s3.endpoint},
        "runtime": {"work_dir": str(tmp_path / "work")},
        **sections,
    }
    path = tmp_path / f"{model_name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


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

    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        served = mlflow.pyfunc.load_model("models:/services-sst2@champion")
    finally:
        mlflow.set_tracking_uri(None)
    texts = ["A gorgeous, moving and beautifully acted film.", "Dull, lifeless and far too long."]
    out = served.predict(pd.DataFrame({"text": texts}))
    assert out["label"].tolist() == ["positive", "negative"]

    # The model's files went through the server into S3, not onto this disk.
    listed = s3_env.client().list_objects_v2(Bucket=mlflow_server.bucket, Prefix="artifacts/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert any(key.endswith("/MLmodel") for key in keys), keys[:20]
    assert any(key.endswith("head.safetensors") for key in keys), keys[:20]
    assert not list((tmp_path / "work").rglob("mlartifacts"))
