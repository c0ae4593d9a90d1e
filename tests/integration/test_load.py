"""Load: eight pipelines at once against one MLflow server and one S3 store on this machine
(small data, linear probes, each with another label budget): all finish, each registers
exactly one version, and the champion at the end is the best of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.integration.conftest import MlflowServer, S3Server, sst2_on_s3

pytestmark = [pytest.mark.integration, pytest.mark.load]
BUCKET = "load"
BUDGETS = [2, 4, 8, 16, 32, 64, 128, 512]  # examples per label: eight different models
NAME = "load-sst2"


@pytest.fixture(scope="module")
def load_data(s3_server: S3Server, sst2_small: dict[str, Path]) -> str:
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(sst2_small["train"]), BUCKET, "sst2/train.tsv")
    client.upload_file(str(sst2_small["test"]), BUCKET, "sst2/dev.tsv")
    return BUCKET


def test_eight_pipelines_at_once_each_register_one_version_and_the_best_is_champion(
    tmp_path: Path, s3_env: S3Server, mlflow_server: MlflowServer, load_data: str
) -> None:
    runs = []
    for budget in BUDGETS:
        folder = tmp_path / f"budget-{budget}"
        folder.mkdir()
        config = {
            "data": sst2_on_s3(BUCKET),
            "strategy": {"name": "linear_probe"},
            "training": {"examples_per_class": budget},
            "storage": {"s3_endpoint_url": s3_env.endpoint},
            # The best always takes the alias: what is under test is that concurrent
            # registrations leave the right one, not the significance test.
            "registry": {"tracking_uri": mlflow_server.url, "model_name": NAME, "gate": "none"},
            "runtime": {"work_dir": str(folder / "work"), "num_threads": 1},
        }
        path = folder / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        summary = folder / "summary.json"
        cli = str(Path(sys.executable).with_name("transferkit"))
        command = [cli, "run", str(path), "--summary", str(summary)]
        log = open(folder / "output.txt", "w")  # noqa: SIM115 - closed below
        runs.append((budget, summary, log, subprocess.Popen(command, stdout=log, stderr=log)))
    for budget, _, log, process in runs:
        code = process.wait(timeout=1500)
        log.close()
        output = (tmp_path / f"budget-{budget}" / "output.txt").read_text()
        assert code == 0, output[-3000:]

    summaries = {budget: json.loads(summary.read_text()) for budget, summary, _, _ in runs}
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    versions = client.search_model_versions(f"name = '{NAME}'")
    # One version per pipeline, each the one its summary names.
    assert sorted(int(v.version) for v in versions) == list(range(1, len(BUDGETS) + 1))
    assert sorted(s["model_uri"] for s in summaries.values()) == sorted(
        f"models:/{NAME}/{v.version}" for v in versions
    )
    accuracy = {b: s["metrics"]["test_accuracy"] for b, s in summaries.items()}
    best = max(accuracy.values())
    champion = client.get_model_version_by_alias(NAME, "champion")
    winners = [f"models:/{NAME}/{champion.version}"]
    assert winners[0] in {s["model_uri"] for b, s in summaries.items() if accuracy[b] == best}
    assert [m.name for m in client.search_registered_models(f"name LIKE '{NAME}%'")] == [NAME]
