"""Resumable training: a training process killed mid-epoch resumes from its last checkpoint
and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import image_config
from transferkit.training import train

# 546 images in batches of 64: 9 steps an epoch, 27 in all; a checkpoint every 4 steps.
TRAINING = {
    "epochs": 3,
    "batch_size": 64,
    "learning_rate": 1e-3,
    "precision": "fp32",
    "ema_decay": 0.9,
    "early_stopping_patience": 0,
    "eval_every_steps": 5,
}
STRATEGY = {"name": "partial_finetune", "train_top_layers": 3}


def config_for(breast_run: tuple, tmp_path: Path, checkpoints: Path | None):
    _, data, resnet20 = breast_run
    training = dict(TRAINING)
    if checkpoints is not None:
        training.update(checkpoint_every_steps=4, checkpoint_uri=str(checkpoints))
    return image_config(tmp_path, data, resnet20, strategy=STRATEGY, training=training)


def fit(breast_run: tuple, tmp_path: Path, checkpoints: Path | None, out: Path):
    root = breast_run[0]
    config = config_for(breast_run, tmp_path, checkpoints)
    return train(config, root / "dataset", root / "backbone", root / "features", out)


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    state = load_file(str(model_dir / "encoder" / "model.safetensors"))
    return {k: v.numpy() for k, v in state.items()}


def test_killed_mid_epoch_resumes_from_the_last_checkpoint_and_ends_as_if_never_stopped(
    breast_run: tuple, tmp_path: Path
) -> None:
    # Uninterrupted, without and with checkpoints: saving them changes nothing.
    plain = fit(breast_run, tmp_path / "a", None, tmp_path / "plain")
    saved = fit(breast_run, tmp_path / "b", tmp_path / "ck-b", tmp_path / "saved")
    assert saved.details["validations"] == plain.details["validations"]
    assert saved.details["resumed_from_step"] is None
    assert not list((tmp_path / "ck-b").rglob("checkpoint.pt"))  # removed at the end

    # The same training in another process, killed once it has saved the step-12 checkpoint
    # (step 12 is the third of the nine steps of epoch 2).
    checkpoints = tmp_path / "ck-c"
    script = tmp_path / "train_in_a_child.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import logging, sys
            from pathlib import Path
            from tests.unit.test_checkpoint import fit
            logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
            root, data, resnet20 = {str(breast_run[0])!r}, {breast_run[1]!r}, {str(breast_run[2])!r}
            breast_run = (Path(root), data, Path(resnet20))
            fit(breast_run, Path({str(tmp_path / "c")!r}), Path({str(checkpoints)!r}),
                Path({str(tmp_path / "never")!r}))
            """
        )
    )
    repository = Path(__file__).parents[2]
    child = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=repository,
        env={**os.environ, "PYTHONPATH": str(repository)},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stderr is not None
    seen = []
    for line in child.stderr:
        seen.append(line)
        if "checkpoint at step 12" in line:
            os.killpg(child.pid, signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert not (tmp_path / "never").exists()
    assert len(list(checkpoints.rglob("checkpoint.pt"))) == 1

    resumed = fit(breast_run, tmp_path / "c", checkpoints, tmp_path / "resumed")
    assert resumed.details["resumed_from_step"] == 12
    assert resumed.details["steps"] == plain.details["steps"] == 27
    # The validations before the kill come from the checkpoint, the rest were recomputed.
    for before, after in zip(
        plain.details["validations"], resumed.details["validations"], strict=True
    ):
        assert after["step"] == before["step"]
        assert after["roc_auc"] == pytest.approx(before["roc_auc"], abs=1e-6)
    assert resumed.validation_metric == pytest.approx(plain.validation_metric, abs=1e-6)
    expected, got = weights(tmp_path / "plain"), weights(tmp_path / "resumed")
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-5, err_msg=key)
    assert not list(checkpoints.rglob("checkpoint.pt"))
