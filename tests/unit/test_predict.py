"""`transferkit predict` and every other loader of a logged model load only transferkit's own
models-from-code models: any other pyfunc would run its code on the caller's machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.unit.test_register_model import register, with_store
from transferkit.cli import main

MARKER_ENV = "TRANSFERKIT_TEST_MARKER"


def make_marker() -> mlflow.pyfunc.PythonModel:
    """Runs when the pickle below is loaded: what an attacker's code would do."""
    Path(os.environ[MARKER_ENV]).write_text("code ran")
    return Harmless()


class Harmless(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        Path(os.environ[MARKER_ENV]).write_text("load_context ran")

    def predict(self, context, model_input):
        return pd.DataFrame({"label": ["pwned"] * len(model_input), "score": 1.0})


class Trojan(Harmless):
    """Unpickles by calling make_marker (cloudpickle keeps __reduce__)."""

    def __reduce__(self) -> tuple:
        return (make_marker, ())


# A models-from-code file under transferkit's own entry's name, with other code in it.
FOREIGN_ENTRY = """
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow

if os.environ.get("TRANSFERKIT_TEST_MARKER"):
    Path(os.environ["TRANSFERKIT_TEST_MARKER"]).write_text("model code ran")


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input.assign(label="pwned", score=1.0)


mlflow.models.set_model(Echo())
"""


def log_and_register(tmp_path: Path, python_model: object, **kwargs: object) -> str:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=python_model, **kwargs)
    mlflow.register_model(info.model_uri, "evil")
    return store


@pytest.mark.parametrize("kind", ["cloudpickle", "foreign-code"])
def test_predict_refuses_a_model_that_is_not_transferkits(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # the SQLite store puts artifacts under ./mlruns
    marker = tmp_path / "marker"
    if kind == "cloudpickle":
        # A user who allowed pickles for some other model: MLflow itself would then load it.
        monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
        store = log_and_register(tmp_path, Trojan())
        reason = "a pickled python_model (python_model.pkl), which runs code when loaded"
    else:
        entry = tmp_path / "code" / "pyfunc_entry.py"
        entry.parent.mkdir()
        entry.write_text(FOREIGN_ENTRY)
        # Laid out exactly like transferkit's (one 'model' artifact): only the code differs.
        (tmp_path / "weights").mkdir()
        (tmp_path / "weights" / "transferkit.json").write_text("{}")
        store = log_and_register(
            tmp_path, str(entry), artifacts={"model": str(tmp_path / "weights")}
        )
        reason = "a pyfunc_entry.py that is not transferkit's (other code)"
    assert not marker.exists()  # logging it ran nothing
    monkeypatch.setenv(MARKER_ENV, str(marker))
    before = set(tmp_path.rglob("*"))
    capsys.readouterr()

    for uri in ("models:/evil/1", "models:/evil@champion"):
        if uri.endswith("@champion"):
            mlflow.MlflowClient(store, store).set_registered_model_alias("evil", "champion", "1")
        code = main(["predict", uri, "some text", "--tracking-uri", store])
        err = capsys.readouterr().err
        assert not marker.exists()
        assert code == 1
        assert "Traceback" not in err
        assert err.splitlines()[-1] + "\n" == (
            f"error: {uri}: not a transferkit model: {reason}; refusing to load it, since "
            "loading would run its code here — load only models that transferkit registered\n"
        )
    assert set(tmp_path.rglob("*")) == before  # nothing left behind (the scratch download)


def test_a_registered_transferkit_model_still_predicts(
    tmp_path: Path, evaluated: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    register(config, artifacts, evaluation, tmp_path / "registration.json")
    store = config.tracking_uri
    assert store is not None
    for uri in ("models:/sst2-test@champion", "models:/sst2-test/1"):
        args = ["predict", uri, "a wonderful, moving film", "a dull, lifeless mess"]
        assert main([*args, "--tracking-uri", store, "--json"]) == 0
        records = json.loads(capsys.readouterr().out)
        assert [r["label"] for r in records] == ["positive", "negative"]


def test_a_foreign_champion_is_not_loaded_nor_replaced_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evaluated: tuple
) -> None:
    monkeypatch.chdir(tmp_path)
    config, artifacts, evaluation = evaluated
    config = with_store(config, tmp_path)
    entry = tmp_path / "code" / "pyfunc_entry.py"
    entry.parent.mkdir()
    entry.write_text(FOREIGN_ENTRY)
    (tmp_path / "weights").mkdir()
    shutil.copytree(artifacts / "model", tmp_path / "weights", dirs_exist_ok=True)
    store = log_and_register(tmp_path, str(entry), artifacts={"model": str(tmp_path / "weights")})
    client = mlflow.MlflowClient(store, store)
    client.create_registered_model("sst2-test")
    source = client.get_model_version("evil", "1").source
    client.create_model_version("sst2-test", source)
    client.set_registered_model_alias("sst2-test", "champion", "1")
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))

    result = register(config, artifacts, evaluation, tmp_path / "registration.json")
    assert (result.version, result.champion) == ("2", False)
    assert result.reason == (
        "champion v1: models:/sst2-test/1: not a transferkit model: a pyfunc_entry.py that is "
        "not transferkit's (other code); refusing to load it, since loading would run its code "
        "here — load only models that transferkit registered; compare them by hand"
    )
    assert not marker.exists()


def test_a_non_utf8_argument_is_refused_in_one_line(probe_run: tuple) -> None:
    _, artifacts, _ = probe_run
    script = Path(sys.executable).with_name("transferkit")
    done = subprocess.run(
        [script, "predict", str(artifacts / "model"), "fine", b"caf\xff"],
        capture_output=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
        timeout=300,
    )
    assert done.stderr.decode() == (
        "error: input 2: bytes that are not UTF-8 (at character 4); pass UTF-8 text (check "
        "the terminal's encoding, LANG/LC_ALL)\n"
    )
    assert (done.returncode, done.stdout) == (1, b"")


def test_every_pyfunc_load_in_the_package_follows_the_check() -> None:
    # Source guard: a new loader must go through registry.fetch_logged_model first.
    import ast

    import transferkit

    package = Path(transferkit.__file__).parent
    loaders = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            calls = {
                node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                for node in ast.walk(function)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
            }
            if "load_model" in calls:
                loaders.append((path.name, function.name, "fetch_logged_model" in calls))
    assert loaders == [("cli.py", "cmd_predict", True)]
