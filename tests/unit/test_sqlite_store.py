"""New SQLite MLflow stores copied from a migrated empty one (transferkit/sqlite_store.py):
the copy is the store MLflow would have built, nothing that exists is touched, and any
failure leaves MLflow to build the store itself."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from transferkit import sqlite_store


def rows(path: Path, query: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(query).fetchall()


def schema(path: Path) -> dict[str, Any]:
    """Every table's columns (name, type, not-null, default, key) and the index names.

    Column order is left out: MLflow reaches the same schema by migrations whose ALTERs
    append columns in an order that can differ from one build to another.
    """
    tables = [name for (name,) in rows(path, "SELECT name FROM sqlite_master WHERE type='table'")]
    columns = {
        table: sorted(tuple(column[1:]) for column in rows(path, f'PRAGMA table_info("{table}")'))
        for table in tables
    }
    indexes = sorted(rows(path, "SELECT name, tbl_name FROM sqlite_master WHERE type='index'"))
    return {"columns": columns, "indexes": indexes}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def private_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))


def test_a_copied_store_is_the_store_mlflow_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    built = tmp_path / "built.db"
    MlflowClient(tracking_uri=f"sqlite:///{built}").search_experiments()
    copied = tmp_path / "work" / "mlflow.db"
    assert sqlite_store.prepare(f"sqlite:///{copied}")
    assert schema(copied) == schema(built)
    version = "SELECT version_num FROM alembic_version"
    assert rows(copied, version) == rows(built, version)
    experiments = "SELECT experiment_id, name, artifact_location FROM experiments"
    assert rows(copied, experiments) == rows(built, experiments)
    assert rows(copied, experiments)[0][2] == str(tmp_path / "mlruns" / "0")
    client = MlflowClient(tracking_uri=f"sqlite:///{copied}")
    experiment = client.create_experiment("transferkit")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "accuracy", 0.8)
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.8}
    assert list(tmp_path.glob("work/.*")) == []  # no staged copy left behind


def test_the_template_is_built_once(cache: Path, tmp_path: Path) -> None:
    assert sqlite_store.prepare(f"sqlite:///{tmp_path / 'a.db'}")
    (template,) = (cache / "transferkit").glob("mlflow-*-empty.db")
    stamp = template.stat().st_mtime_ns
    assert sqlite_store.prepare(f"sqlite:///{tmp_path / 'b.db'}")
    assert template.stat().st_mtime_ns == stamp
    assert rows(template, "SELECT count(*) FROM runs") == [(0,)]  # the copies' runs are theirs


def test_an_existing_store_and_other_uris_are_left_alone(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"someone's store")
    assert not sqlite_store.prepare(f"sqlite:///{store}")
    assert store.read_bytes() == b"someone's store"
    for uri in ("http://127.0.0.1:5000", str(tmp_path / "mlruns"), "databricks"):
        assert not sqlite_store.prepare(uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_store_that_appears_meanwhile_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process created the store between the check and the copy: it stays."""
    store = tmp_path / "mlflow.db"
    real_link = sqlite_store.os.link

    def first_comes_another(source: Path, target: Path) -> None:
        Path(target).write_bytes(b"the other process's store")
        real_link(source, target)

    monkeypatch.setattr(sqlite_store.os, "link", first_comes_another)
    assert not sqlite_store.prepare(f"sqlite:///{store}")
    assert store.read_bytes() == b"the other process's store"
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]


def test_an_unwritable_cache_leaves_mlflow_to_build_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    store = tmp_path / "work" / "mlflow.db"
    assert not sqlite_store.prepare(f"sqlite:///{store}")
    assert not store.exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
