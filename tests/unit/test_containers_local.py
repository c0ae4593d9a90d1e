"""What every step's container of a containerised local run is given: mounts and environment.

No engine runs here (tests/images and bench/quickstart_containers.py run real containers).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_config
from transferkit.config import load_config
from transferkit.containers import source_digest
from transferkit.containers_local import check_engine, container_environment, container_mounts
from transferkit.errors import ConfigError


def test_mounts_work_dir_writable_and_inputs_read_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\na\t0\n")
    (data / "dev.tsv").write_text("sentence\tlabel\na\t0\n")
    model = tmp_path / "models" / "bert"
    model.mkdir(parents=True)
    config = make_config(
        tmp_path,
        {"train_uri": str(data / "train.tsv"), "test_uri": f"file://{data / 'dev.tsv'}"},
        backbone={"uri": str(model)},
    )
    mounts = dict(container_mounts(config))
    work = tmp_path / "work"
    # The work dir holds the feature cache, MLflow's SQLite store and the pipeline root
    # (which KFP mounts itself): one writable mount covers them all.
    assert mounts == {work: False, data: True, model: True}
    assert (work / "mlflow.db").parent.is_dir()


def test_outside_feature_cache_and_store_are_mounted_writable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\na\t0\n")
    config = make_config(
        tmp_path,
        {"train_uri": str(data / "train.tsv")},
        runtime={"work_dir": str(tmp_path / "work"), "feature_cache": str(tmp_path / "cache")},
        registry={"tracking_uri": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"},
    )
    mounts = dict(container_mounts(config))
    assert mounts[tmp_path / "cache"] is False
    assert mounts[tmp_path / "store"] is False
    # The packaged backbone (package://) is inside the image: nothing to mount for it.
    assert set(mounts) == {tmp_path / "work", tmp_path / "cache", tmp_path / "store", data}


def test_environment_forwards_step_settings_only() -> None:
    env = container_environment(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": "/root/.cache/huggingface",  # a host folder: not in the container
            "AWS_ACCESS_KEY_ID": "key",
            "MLFLOW_TRACKING_TOKEN": "token",
            "PATH": "/usr/bin",
            "HOME": "/root",
        }
    )
    assert env == {
        "HF_HUB_OFFLINE": "1",
        "AWS_ACCESS_KEY_ID": "key",
        "MLFLOW_TRACKING_TOKEN": "token",
        "HOME": "/tmp",
    }


def test_no_docker_api_is_one_line_naming_docker_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'none.sock'}")
    config = make_config(tmp_path, {"uri": str(tmp_path / "d.tsv")}, runtime={"runner": "docker"})
    with pytest.raises(ConfigError) as raised:
        check_engine(config)
    message = str(raised.value)
    assert f"no Docker API answers at unix://{tmp_path / 'none.sock'}" in message
    assert "set DOCKER_HOST" in message
    assert "\n" not in message


def test_gpu_training_is_refused_in_containers(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"uri": str(tmp_path / "d.tsv")},
        runtime={"runner": "docker"},
        resources={"train": {"accelerator": {"type": "nvidia.com/gpu", "count": 1}}},
    )
    with pytest.raises(ConfigError, match="no GPU passthrough"):
        check_engine(config)


def test_an_unknown_runner_is_one_line_naming_the_choices(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"data: {{uri: {tmp_path / 'd.tsv'}, text_column: t}}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, ["runtime.runner=kubernetes"])
    assert "runtime.runner" in str(raised.value)
    assert "'subprocess' or 'docker'" in str(raised.value)
    assert "\n" not in str(raised.value)


# images/build.sh's line that labels the image with the digest of the code it installs.
_BUILD_SH = Path(__file__).resolve().parents[2] / "images" / "build.sh"


def test_build_sh_labels_the_image_with_source_digest(tmp_path: Path) -> None:
    script = _BUILD_SH.read_text()
    start = script.index("source_digest=$(")
    line = script[start : script.index("\n", script.index("cut -c1-16", start))]
    package = tmp_path / "transferkit"
    for name, text in {
        "__init__.py": "x = 1\n",
        "a.py": "a\n",
        "a/b.py": "b\n",  # 'a.py' and 'a/b.py' sort one way as bytes, another as path parts
        "B.py": "B\n",
        "data/notes.txt": "not code\n",
        "__pycache__/a.cpython-311.py": "compiled\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    shell = subprocess.run(
        ["bash", "-c", f'wheel_source={tmp_path}\n{line}\necho "$source_digest"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert shell == source_digest(package)
    (package / "a" / "b.py").write_text("changed\n")
    assert source_digest(package) != shell
