"""New SQLite MLflow stores as copies of an empty store already migrated.

MLflow builds a new SQLite tracking store by running every schema migration it has, one
after the other: about 4 s on a 2-core CPU, paid by the first run in every new work dir (and
by every test that starts from an empty one). The first store built on a machine for an
MLflow version is kept, empty, in the user's cache folder; later new stores are copies of it,
with the one row that depends on where MLflow was started (the Default experiment's artifact
location) set as MLflow would have set it.

A store that exists is never touched, and a copy only lands where no file is (a hard link
from a private copy, which fails when another process was first). Anything that goes wrong
(a read-only home, a file system without hard links) leaves MLflow to build the store itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "sqlite:///"


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/transferkit`` (unset: ``~/.cache/transferkit``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferkit"


def template(version: str) -> Path:
    """The empty, migrated store of this MLflow version, built on first use."""
    built = cache_folder() / f"mlflow-{version}-empty.db"
    if built.is_file():
        return built
    built.parent.mkdir(parents=True, exist_ok=True)
    staged = built.with_name(f".{built.name}.{os.getpid()}.tmp")
    staged.unlink(missing_ok=True)
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=PREFIX + str(staged)).search_experiments()
        os.replace(staged, built)
    finally:
        staged.unlink(missing_ok=True)
    return built


def prepare(uri: str) -> bool:
    """Put a copy of the migrated empty store at a ``sqlite:///`` URI's missing file.

    Returns whether it did; False for other URIs, an existing file, or any failure (MLflow
    then builds the store itself).
    """
    if not uri.startswith(PREFIX):
        return False
    target = Path(uri.removeprefix(PREFIX))
    if target.exists():
        return False
    import mlflow

    staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        source = template(mlflow.__version__)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staged)
        with contextlib.closing(sqlite3.connect(staged)) as db, db:
            # MLflow records the Default experiment under ./mlruns of the directory it was
            # started from.
            location = str(Path.cwd() / "mlruns" / "0")
            db.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (location,),
            )
        os.link(staged, target)  # fails if a store appeared meanwhile: that one stays
        return True
    except (OSError, sqlite3.Error) as error:
        log.debug("no copied MLflow store at %s (%s): MLflow builds it", target, error)
        return False
    finally:
        staged.unlink(missing_ok=True)
