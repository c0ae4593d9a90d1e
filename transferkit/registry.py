"""register_model: an MLflow run, a registered model version, and the champion decision.

The run records the flattened config as params, the evaluation metrics, the report, plot,
label map and config as artifacts, and the model as a pyfunc with a signature and an input
example. The new version gets alias ``challenger``; it becomes ``champion`` only when it
beats the current champion on the same evaluation rows: the champion is downloaded and
re-scored on this run's evaluation split, and a paired test (McNemar or a bootstrap) must find
the gain significant (``registry.gate``). The test, its p-value and interval are recorded in the
run. Registration is all-or-nothing: if anything fails after the version was created, the
version is deleted. Registering the same model twice reuses the existing version: the model's
fingerprint covers its weights, configs, tokenizer, labels and input settings, not its
timings or provenance (training.model.model_fingerprint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel

from transferkit import storage
from transferkit.backbones.modality import dataset_modality
from transferkit.config import PipelineConfig, flatten
from transferkit.data import load_labels
from transferkit.data.dataset import SCORE, label_sets
from transferkit.errors import RegistryError
from transferkit.evaluation import score_metrics, set_metrics
from transferkit.metrics import PairedComparison, paired_comparison
from transferkit.multilabel import MultiLabelScores
from transferkit.regression import RegressionScores
from transferkit.served_env import WHEELS, build_served_wheel, served_requirements
from transferkit.termination import sigterm_raises
from transferkit.tracking import (
    MAX_PARAM,
    TAG,
    http_policy,
    redact,
)
from transferkit.tracking import client as _client
from transferkit.tracking import experiment as _experiment
from transferkit.tracking import registry_error as _registry_error

log = logging.getLogger(__name__)

PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")


class RegistrationResult(BaseModel):
    """Where the model went and whether it is now the champion."""

    model_name: str
    version: str
    model_uri: str
    champion_uri: str
    run_id: str
    tracking_uri: str
    champion: bool
    reason: str
    previous_champion: str | None
    metrics: dict[str, float]
    scores: dict[str, Any]
    comparison: PairedComparison | None
    reused: bool
    seconds: float
    sweep_run_id: str | None = None


LOCK_SUFFIX = ".transferkit-lock"
LOCK_HOLDER = TAG + "lock_holder"
LOCK_HEARTBEAT = TAG + "lock_heartbeat"


class Heartbeat(threading.Thread):
    """Refreshes the lock's heartbeat tag every ``every`` seconds while the lock is held.

    A waiter takes a heartbeat that has not changed for a lease as a dead holder. Each beat
    first checks the lock is still this holder's: one broken in the meantime is reported
    through ``lost`` instead of being written on another holder's lock.
    """

    def __init__(self, client: Any, lock: str, holder: str, every: float) -> None:
        super().__init__(name=f"heartbeat {lock}", daemon=True)
        self.client, self.lock, self.holder, self.every = client, lock, holder, every
        self.stopped = threading.Event()
        self.lost: str | None = None
        self.broken: list[str] = []  # holders whose stale locks were broken to acquire it

    def run(self) -> None:
        from mlflow.exceptions import MlflowException

        beat = 0
        while not self.stopped.wait(self.every):
            beat += 1
            try:
                owner = self.client.get_registered_model(self.lock).tags.get(LOCK_HOLDER)
                if owner != self.holder:
                    self.lost = f"it was broken and is now held by {owner}"
                    return
                if self.stopped.is_set():
                    return
                self.client.set_registered_model_tag(
                    self.lock, LOCK_HEARTBEAT, f"{beat} {time.time():.3f}"
                )
            except MlflowException as exc:
                if exc.error_code in _ABSENT:
                    self.lost = "it was broken by another registration"
                    return
                log.warning("could not refresh the heartbeat of %s (%s)", self.lock, exc)
            except Exception as exc:  # a lost connection: the next beat tries again
                log.warning("could not refresh the heartbeat of %s (%s)", self.lock, exc)

    def check(self) -> None:
        """Raise RegistryError if another registration broke the lock."""
        if self.lost is not None:
            raise RegistryError(
                f"the promotion lock {self.lock} was lost: {self.lost}, its heartbeat having "
                "stalled for registry.lock_lease; nothing was promoted, retry the run (and "
                "raise registry.lock_lease if the tracking server is slow)"
            )


@contextlib.contextmanager
def promotion_lock(
    client: Any,
    name: str,
    holder: str,
    timeout: float,
    abandoned_after: float | None = None,
    lease: float = 15.0,
) -> Iterator[Heartbeat]:
    """Hold the promotion lock of registered model ``name`` for the calls inside.

    The lock is a registered model named ``NAME.transferkit-lock`` that exists while one
    registration reads the champion, compares, registers and moves the aliases. MLflow stores
    a name at most once (a unique key), so creating it acquires and deleting it releases,
    whatever the number of servers and clients. Without it two runs finishing together both
    see the same champion (or none) and the last to move the alias wins, better or not.

    The holder refreshes a heartbeat tag on the lock every ``lease / 5`` seconds from a
    daemon thread. A waiter that sees the heartbeat unchanged for ``lease`` seconds of its
    own clock takes the holder as dead (killed, out of memory, its node gone) and breaks the
    lock, saying so; no two hosts' clocks are compared, so skew cannot break a live lock.

    Args:
        holder: who holds it (the pipeline run id), shown to whoever waits; a lock this
            holder left (a retried step) is taken over at once.
        timeout: seconds to wait for a live holder.
        abandoned_after: a lock without heartbeat (from a transferkit before heartbeats)
            older than this many seconds is taken as abandoned and broken; None: ``timeout``.
        lease: seconds without a heartbeat after which a lock is broken.

    Yields:
        The heartbeat: ``check()`` raises RegistryError if the lock was broken meanwhile.

    Raises:
        RegistryError: a live registration held the lock for the whole ``timeout``.
    """
    import random

    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    deadline = time.monotonic() + timeout
    delay = 0.2
    seen: tuple[str, float] | None = None  # the holder's heartbeat, and when it was first seen
    acquired = False
    heartbeat = Heartbeat(client, lock, holder, lease / 5)
    try:
        while True:
            try:
                client.create_registered_model(
                    lock,
                    tags={LOCK_HOLDER: holder, LOCK_HEARTBEAT: f"0 {time.time():.3f}"},
                    description=f"held by {holder}",
                )
                acquired = True
                break
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            try:
                held = client.get_registered_model(lock)
            except MlflowException as exc:
                if exc.error_code in _ABSENT:
                    continue  # released in the meantime
                raise
            owner = held.tags.get(LOCK_HOLDER, "?")
            if owner == holder:
                # This run's own lock, left by an attempt the server died under: a retry of
                # the step takes it over instead of waiting for it to lapse.
                log.warning("taking over the promotion lock of %s an earlier attempt left", name)
                acquired = True
                break
            age = time.time() - held.creation_timestamp / 1000
            beat = held.tags.get(LOCK_HEARTBEAT)
            stale = None
            if beat is None:  # a holder from before heartbeats: only the lock's age tells
                if age > (timeout if abandoned_after is None else abandoned_after):
                    stale = f"held {age:.0f} s with no heartbeat"
            elif seen is None or seen[0] != beat:
                seen = (beat, time.monotonic())
            elif time.monotonic() - seen[1] > lease:
                stale = (
                    f"its heartbeat stopped: unchanged for {time.monotonic() - seen[1]:.1f} s "
                    f"(registry.lock_lease {lease:g} s)"
                )
            if stale is not None:
                log.warning("breaking the promotion lock of %s held by %s: %s", name, owner, stale)
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock)
                heartbeat.broken.append(owner)
                seen = None
                continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"registered model '{name}' is being promoted by {owner} for {age:.0f} s; "
                    f"retry later, or delete the registered model '{lock}' if that run is dead"
                )
            time.sleep(min(delay * (0.5 + random.random()), lease / 3))
            delay = min(delay * 1.5, 5.0)
        heartbeat.start()
        yield heartbeat
    finally:
        heartbeat.stopped.set()
        if heartbeat.is_alive():
            heartbeat.join(timeout=1)  # no beat written after the release, unless one hangs
        if acquired:
            try:
                client.delete_registered_model(lock)
            except Exception as exc:  # the registration's own outcome matters more
                log.error(
                    "could not release the promotion lock of %s (%s); the next registration "
                    "breaks it %g s after its heartbeat stops",
                    name,
                    exc,
                    lease,
                )


# What MLflow answers when a registered model or an alias does not exist. Anything else
# (a lost connection is INTERNAL_ERROR) propagates: "could not ask" is not "there is none",
# and treating it so would promote without comparing, or register a second copy.
_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _find_version(client: Any, name: str, fingerprint: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(
            f"name = '{name}' and tags.`{TAG}model_fingerprint` = '{fingerprint}'"
        )
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return None
        raise
    ready = [v for v in versions if v.status == "READY"]
    return min(ready, key=lambda v: int(v.version)) if ready else None


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return None
        raise


class _IncomparableError(Exception):
    """The champion cannot be scored on this run's evaluation rows."""


# What register_model logs (``_log_run``): a models-from-code pyfunc whose code is
# transferkit's own entry file and whose one artifact is the model folder. Anything else in a
# registry (a cloudpickled PythonModel, another code file, extra code paths, another loader)
# runs its own code when loaded, so it is refused before ``mlflow.pyfunc.load_model``.
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"


def _untrusted_reason(mlmodel: Any, model_dir: Path | None) -> str | None:
    """Why an MLmodel (parsed) is not one that transferkit logged; None when it is.

    With ``model_dir`` (the downloaded model), the code file MLflow would execute must also be
    byte-for-byte transferkit's entry.
    """
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        found = sorted(flavors) if isinstance(flavors, dict) else "none"
        return f"flavors {found}, not python_function alone"
    pyfunc = flavors["python_function"]
    if not isinstance(pyfunc, dict):
        return "an empty python_function flavor"
    if "python_model" in pyfunc:
        return f"a pickled python_model ({pyfunc['python_model']}), which runs code when loaded"
    if pyfunc.get("loader_module") != CODE_LOADER:
        return f"loader_module {pyfunc.get('loader_module')!r}, not {CODE_LOADER}"
    if pyfunc.get("code"):
        return f"code paths ({pyfunc['code']}) that would be put on sys.path"
    code = pyfunc.get("model_code_path")
    if not isinstance(code, str) or Path(code).name != PYFUNC_ENTRY.name:
        return f"model code {code!r}, not transferkit's {PYFUNC_ENTRY.name}"
    artifacts = pyfunc.get("artifacts")
    path = artifacts.get("model", {}).get("path") if isinstance(artifacts, dict) else None
    if set(artifacts or {}) != {"model"} or not isinstance(path, str):
        return f"artifacts {sorted(artifacts or {})}, not transferkit's one 'model' folder"
    if Path(path).is_absolute() or ".." in Path(path).parts:
        return f"a model artifact path outside the model ({path})"
    if model_dir is not None:
        entry = model_dir / PYFUNC_ENTRY.name
        if entry.is_symlink() or not entry.is_file():
            return f"no plain {PYFUNC_ENTRY.name} in the model"
        if entry.read_bytes() != PYFUNC_ENTRY.read_bytes():
            return f"a {PYFUNC_ENTRY.name} that is not transferkit's (other code)"
    return None


def _check_logged_model(mlmodel_path: Path, uri: str, model_dir: Path | None) -> dict[str, Any]:
    """The parsed MLmodel, or RegistryError when it is not transferkit's models-from-code."""
    mlmodel: Any = None
    reason: str | None
    try:
        mlmodel = yaml.safe_load(mlmodel_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = f"an unreadable MLmodel file ({type(exc).__name__})"
    else:
        reason = _untrusted_reason(mlmodel, model_dir)
    if reason is not None:
        raise RegistryError(
            f"{uri}: not a transferkit model: {reason}; refusing to load it, since loading "
            "would run its code here — load only models that transferkit registered"
        )
    assert isinstance(mlmodel, dict)
    return mlmodel


def fetch_logged_model(uri: str, scratch: Path) -> tuple[Path, dict[str, Any]]:
    """Download a logged or registered model, but only a transferkit one.

    Its MLmodel file alone is fetched and checked first, so a foreign model is refused before
    any of its files arrive; the downloaded copy is checked again (an alias may have moved in
    between) along with the code file MLflow would run. Load the returned folder, never
    ``uri`` itself, with ``mlflow.pyfunc.load_model``.

    Args:
        uri: ``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/…/model`` or an artifact URI
            (tracking and registry URIs already set).
        scratch: an empty folder that holds the download for as long as the model is used.

    Returns:
        The local model folder and its parsed MLmodel.

    Raises:
        RegistryError: the model is not transferkit's models-from-code model (one line:
            the URI and why). MLflow's own exceptions when it cannot be downloaded.
    """
    import mlflow

    base = uri.rstrip("/")
    first = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{base}/MLmodel", dst_path=str(scratch / "check")
    )
    _check_logged_model(Path(first), uri, None)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=base, dst_path=str(scratch / "model"))
    )
    return local, _check_logged_model(local / "MLmodel", uri, local)


def load_version(name: str, version: Any, scratch: Path) -> tuple[Any, Any, Any]:
    """Download a registered version into ``scratch`` and load its classifier.

    Returns:
        The tokenizer (None for images), the classifier and its model card.

    Raises:
        ValueError: the version is not a transferkit model.
    """
    from transferkit.training.model import load_classifier

    try:
        local, mlmodel = fetch_logged_model(f"models:/{name}/{version.version}", scratch)
    except RegistryError as exc:
        raise ValueError(f"champion v{version.version}: {exc}") from None
    try:
        path = mlmodel["flavors"]["python_function"]["artifacts"]["model"]["path"]
        return load_classifier(local / path)
    except Exception as exc:
        raise ValueError(
            f"champion v{version.version} is not a transferkit model ({type(exc).__name__})"
        ) from None


def _champion_predictions(
    config: PipelineConfig,
    champion: Any,
    dataset_dir: Path,
    labels: list[str],
    scratch: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Download the champion and predict this run's evaluation inputs, as evaluate does.

    Returns:
        Class probabilities [rows, labels] and the label ids the champion decides on (by its
        own decision rule).
    """
    from transferkit.backbones.text import resolve_precision
    from transferkit.training.model import predict_proba
    from transferkit.training.runtime import device

    try:
        tokenizer, model, card = load_version(config.registry.model_name, champion, scratch)
    except ValueError as exc:
        raise _IncomparableError(str(exc)) from None
    if card.regression != (labels == [SCORE]):
        kind = "scores" if card.regression else "labels"
        raise _IncomparableError(f"champion v{champion.version} predicts {kind}, this model not")
    if card.labels != labels:
        raise _IncomparableError(
            f"champion v{champion.version} predicts {card.labels}, this model {labels}"
        )
    target = device()
    precision = resolve_precision(config.evaluation.precision, target)
    modality = dataset_modality(dataset_dir)
    if card.input_modality().name != modality.name:
        raise _IncomparableError(f"champion v{champion.version} takes another kind of input")
    inputs, _ = modality.load(dataset_dir, "test")
    proba = predict_proba(
        model.to(target), tokenizer, card, inputs, config.evaluation.batch_size, precision
    )
    return proba, card.decide(proba)


def compare_with_champion(
    config: PipelineConfig,
    champion: Any,
    dataset_dir: Path,
    evaluation_dir: Path,
    labels: list[str],
) -> PairedComparison:
    """Score the champion on this run's evaluation rows and test the paired difference."""
    truth = load_labels(dataset_dir, "test")
    predictions = pd.read_parquet(evaluation_dir / "predictions.parquet")
    with tempfile.TemporaryDirectory(prefix="transferkit-champion-") as scratch:
        old, old_predicted = _champion_predictions(
            config, champion, dataset_dir, labels, Path(scratch)
        )
    new_predicted = predictions["predicted"].to_numpy()
    if truth.dtype.kind == "f":  # scores (regression): the predictions are the outputs
        new = new_predicted[:, None]
    else:
        new = predictions[[f"p_{name}" for name in labels]].to_numpy()
    if truth.ndim == 2:  # label sets: each row's predicted ids back into a boolean matrix
        if old_predicted.ndim != 2:
            raise _IncomparableError(f"champion v{champion.version} predicts one label per row")
        new_predicted = label_sets(new_predicted, truth.shape[1])
    method = "mcnemar" if config.registry.gate == "none" else config.registry.gate
    return paired_comparison(
        truth,
        new,
        old,
        labels,
        config.evaluation.primary_metric,
        method,
        config.registry.significance,
        config.registry.bootstrap_samples,
        seed=config.training.seed,
        challenger_predicted=new_predicted,
        champion_predicted=old_predicted,
    )


def decide(
    comparison: PairedComparison,
    champion_version: str,
    config: PipelineConfig,
) -> tuple[bool, str]:
    """Promote only for a gain above ``min_improvement`` that the gate finds significant."""
    registry = config.registry
    c = comparison
    reason = (
        f"{c.metric} {c.challenger:.4f} vs champion v{champion_version} {c.champion:.4f} "
        f"on the same {c.rows} rows (gain {c.gain:+.4f}"
    )
    if registry.gate != "none":
        reason += (
            f"; {c.method} p={c.p_value:.3g}, {c.ci_level:.0%} interval "
            f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]"
        )
    reason += ")"
    if c.gain <= registry.min_improvement:
        return False, f"{reason}: needs a gain > {registry.min_improvement:g}"
    if registry.gate != "none" and c.p_value >= registry.significance:
        return False, f"{reason}: not significant at {registry.significance:g}"
    return True, reason


def _metrics(evaluation: dict[str, Any], training: dict[str, Any]) -> dict[str, float]:
    scores = evaluation["scores"]
    if "spearman" in scores:  # scores (regression)
        metrics = {f"test_{k}": v for k, v in score_metrics(RegressionScores(**scores)).items()}
        return _run_metrics(metrics, training)
    if "per_label" in scores:  # label sets
        metrics = {f"test_{k}": v for k, v in set_metrics(MultiLabelScores(**scores)).items()}
        return _run_metrics(metrics, training)
    metrics = {
        f"test_{name}": scores[name]
        for name in (
            "accuracy",
            "macro_f1",
            "balanced_accuracy",
            "roc_auc",
            "sensitivity",
            "specificity",
        )
        if scores.get(name) is not None
    }
    for name, cls in scores["per_class"].items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        metrics[f"test_f1_{safe}"] = cls["f1"]
        metrics[f"test_recall_{safe}"] = cls["recall"]
    return _run_metrics(metrics, training)


def _run_metrics(metrics: dict[str, Any], training: dict[str, Any]) -> dict[str, float]:
    """``metrics`` with the training run's figures added, as MLflow metrics."""
    metrics = {
        "".join(ch if ch.isalnum() or ch in "-_./ " else "_" for ch in k): v
        for k, v in metrics.items()
    }
    metrics["validation_" + training["primary_metric"]] = training["validation_metric"]
    metrics["train_seconds"] = training["seconds"]
    metrics["trainable_parameters"] = float(training["trainable_parameters"])
    if "labelled_examples" in training:
        metrics["labelled_examples"] = float(training["labelled_examples"])
    folds = training.get("cross_validation")
    if folds:
        name = "cross_validation_" + folds["metric"]
        metrics[name + "_mean"], metrics[name + "_std"] = folds["mean"], folds["std"]
        if "out_of_fold" in folds:
            metrics[name + "_out_of_fold"] = folds["out_of_fold"]
    return {k: float(v) for k, v in metrics.items()}


def read_sweep(evaluation_dir: Path) -> dict[str, Any] | None:
    """The sweep comparison that compare_strategies put beside the selected evaluation."""
    path = evaluation_dir / "sweep" / "comparison.json"
    return storage.read_json(path) if path.is_file() else None


def _log_sweep(
    sweep_dir: Path,
    experiment_id: str,
    tags: dict[str, str],
    pipeline_run_id: str,
    mlflow_run_id: str | None = None,
) -> Any:
    """Start the sweep's parent run (the pipeline run's, ``mlflow_run_id``, where one was
    opened) and log one finished child run per unselected branch.

    Returns:
        The active parent run; the selected branch's run (with the model) nests under it.
    """
    import mlflow

    comparison = storage.read_json(sweep_dir / "comparison.json")
    branches = storage.read_json(sweep_dir / "branches.json")
    metric = comparison["primary_metric"]
    parent_tags = {
        TAG + "sweep": "parent",
        TAG + "pipeline_run_id": pipeline_run_id,
        TAG + "data_fingerprint": tags[TAG + "data_fingerprint"],
        TAG + "backbone_fingerprint": tags[TAG + "backbone_fingerprint"],
        TAG + "selected_branch": comparison["selected"],
        TAG + "negative_transfer": ",".join(comparison["negative_transfer"]) or "none",
    }
    parent = (
        mlflow.start_run(run_id=mlflow_run_id, tags=parent_tags)
        if mlflow_run_id
        else mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"sweep-{pipeline_run_id}"[:250],
            tags=parent_tags,
        )
    )
    try:
        mlflow.log_params({"branches": str(len(branches)), "margin": str(comparison["margin"])})
        best = max(row["validation"] for row in comparison["branches"])
        mlflow.log_metrics({f"best_validation_{metric}": best})
        mlflow.log_artifacts(str(sweep_dir), artifact_path="sweep")
        for row, branch in zip(comparison["branches"], branches, strict=True):
            if row["selected"]:
                continue
            branch_config = PipelineConfig.model_validate(branch["config"])
            training = {
                "primary_metric": metric,
                "validation_metric": row["validation"],
                "seconds": row["train_seconds"],
                "trainable_parameters": row["trainable_parameters"],
                "labelled_examples": row["labelled_examples"],
            }
            if row.get("cross_validation") is not None:
                training["cross_validation"] = {
                    "metric": metric,
                    "mean": row["cross_validation"],
                    "std": row["cross_validation_std"],
                }
            with mlflow.start_run(
                experiment_id=experiment_id,
                run_name=row["name"][:250],
                nested=True,
                tags=_branch_tags(row, pipeline_run_id),
            ):
                mlflow.log_params({k: v[:MAX_PARAM] for k, v in flatten(branch_config).items()})
                mlflow.log_metrics(_metrics({"scores": row["scores"]}, training))
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    return parent


def _branch_tags(row: dict[str, Any], pipeline_run_id: str) -> dict[str, str]:
    tags = {
        TAG + "strategy": row["strategy"],
        TAG + "sweep_branch": row["name"],
        TAG + "examples_per_class": str(row["examples_per_class"] or "all"),
        TAG + "pipeline_run_id": pipeline_run_id,
    }
    if row["negative_transfer"] is not None:
        tags[TAG + "negative_transfer"] = str(row["negative_transfer"]).lower()
        tags[TAG + "delta_vs_scratch"] = f"{row['delta_vs_scratch']:+.6f}"
    return tags


def _log_run(
    config: PipelineConfig,
    client: Any,
    experiment_id: str,
    paths: dict[str, Path],
    tags: dict[str, str],
    metrics: dict[str, float],
    mlflow_run_id: str | None = None,
) -> tuple[str, Any, str | None]:
    """Log the run and register a version; delete the version again if anything fails.

    Into the pipeline run's MLflow run ``mlflow_run_id`` where one was opened: the model, the
    training curves (under the logged model's metrics), the datasets and the step timings.

    A sweep's selected model is logged as a child of the sweep's parent run, beside one child
    run per other branch.

    Returns:
        The model run id, the model version, and the sweep's parent run id (or None).
    """
    import mlflow
    from mlflow.models import infer_signature

    from transferkit.serving import predictions_frame
    from transferkit.training.model import load_classifier, predict_proba

    model_dir = paths["model"]
    sweep_dir = paths["evaluation"] / "sweep"
    pipeline_run_id = tags[TAG + "pipeline_run_id"]
    version = None
    with contextlib.ExitStack() as stack:
        parent = None
        if sweep_dir.is_dir():
            parent = _log_sweep(sweep_dir, experiment_id, tags, pipeline_run_id, mlflow_run_id)
            stack.enter_context(parent)
            name = f"{tags[TAG + 'sweep_branch']}"
        else:
            name = f"{config.strategy.name}-{pipeline_run_id}"
        run = stack.enter_context(
            mlflow.start_run(run_id=mlflow_run_id, tags=tags)
            if mlflow_run_id and parent is None
            else mlflow.start_run(
                experiment_id=experiment_id,
                run_name=name[:250],
                tags=tags,
                nested=parent is not None,
            )
        )
        try:
            params = {k: v[:MAX_PARAM] for k, v in flatten(config).items()}
            mlflow.log_params(params)
            mlflow.log_metrics(metrics)
            # The task's plot: label sets', scores' (regression) or the confusion matrix.
            plots = ("label_scores.png", "scores.png")
            found = (p for p in plots if (paths["evaluation"] / p).exists())
            plot = next(found, "confusion_matrix.png")
            for name in (
                "report.md",
                plot,
                "roc_curve.png",
                "evaluation.json",
                "predictions.parquet",
            ):
                optional = name == "roc_curve.png"  # binary tasks only
                if not optional or (paths["evaluation"] / name).exists():
                    mlflow.log_artifact(str(paths["evaluation"] / name), artifact_path="evaluation")
            for name in ("label_map.json", "stats.json"):
                mlflow.log_artifact(str(paths["dataset"] / name), artifact_path="data")
            mlflow.log_artifact(str(paths["backbone"] / "backbone.json"), artifact_path="data")
            mlflow.log_artifact(str(model_dir / "training.json"), artifact_path="evaluation")
            mlflow.log_text(
                yaml.safe_dump(
                    config.model_dump(mode="json", exclude=config.withheld()), sort_keys=False
                ),
                "config.yaml",
            )

            tokenizer, model, card = load_classifier(model_dir)
            _log_drift_reference(model, tokenizer, card, paths["dataset"], config)
            modality = card.input_modality()
            example = modality.example(paths["dataset"])
            output = predictions_frame(
                predict_proba(model, tokenizer, card, modality.served(example)),
                card.labels,
                card.decision,
                card.regression,
            )
            wheels = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            wheel = build_served_wheel(wheels)
            info = mlflow.pyfunc.log_model(
                name="model",
                # Models from code: the entry file is stored, not a pickle of an object.
                python_model=str(PYFUNC_ENTRY),
                artifacts={"model": str(model_dir)},
                signature=infer_signature(example, output, params={"batch_size": 64}),
                input_example=example,
                pip_requirements=served_requirements(wheel.name),
            )
            # Beside the model, not in code_paths: MLflow would put those on sys.path of
            # every process that loads the model (and _untrusted_reason refuses them). Only
            # an environment built from requirements.txt (mlflow models serve) installs it.
            client.log_model_artifact(info.model_id, str(wheel), WHEELS)
            _log_lineage(config, paths, info.model_id)
            version = mlflow.register_model(info.model_uri, config.registry.model_name, tags=tags)
            client.set_registered_model_alias(
                config.registry.model_name, "challenger", version.version
            )
        except BaseException:  # SIGTERM (Terminated) and KeyboardInterrupt included
            _delete_versions(client, config.registry.model_name, run.info.run_id, version)
            raise
    return run.info.run_id, version, None if parent is None else parent.info.run_id


def _record_reuse(
    client: Any, run_id: str, tags: dict[str, str], metrics: dict[str, float], existing: Any
) -> None:
    """The pipeline run's MLflow run, when its model was already registered: its figures, and
    which version it is."""
    from mlflow.entities import Metric, RunTag

    stamp = int(time.time() * 1000)
    tags = {**tags, TAG + "reused_version": str(existing.version)}
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )


# The artifacts whose JSON records the seconds of the step that wrote them.
_STEP_RECORDS = {
    "ingest_data": ("dataset", "stats.json"),
    "fetch_backbone": ("backbone", "backbone.json"),
    "train": ("model", "training.json"),
    "evaluate": ("evaluation", "evaluation.json"),
}


def _log_lineage(config: PipelineConfig, paths: dict[str, Path], model_id: str) -> None:
    """Into the active run: the datasets (each split with the digest of its rows), the
    training curves per validation (as the logged model's metrics, so MLflow shows them under
    "Model metrics") and the steps' timings as recorded by the runs that made the artifacts
    (a cached step's are its first run's)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import LoggedModelInput

    stats = storage.read_json(paths["dataset"] / "stats.json")
    contexts = {"train": "training", "validation": "validation", "test": "test"}
    for split, context in contexts.items():
        path = paths["dataset"] / f"{split}.parquet"
        if not path.is_file():
            continue
        source_uri = str(stats.get("sources", {}).get(split) or path)
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path
            warnings.simplefilter("ignore", UserWarning)
            try:
                source = resolve_dataset_source(source_uri.split(" ")[0])
            except Exception:  # a source MLflow has no reader for: the ingested split
                source = resolve_dataset_source(str(path))
        dataset = MetaDataset(  # type: ignore[abstract]
            source=source,
            name=f"{config.registry.model_name}-{split}",
            digest=hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        )
        mlflow.log_input(
            dataset,
            context=context,
            tags={"rows": str(stats.get("rows", {}).get(split, ""))},
            model=LoggedModelInput(model_id) if split == "train" else None,
        )
    training = storage.read_json(paths["model"] / "training.json")
    metric = training["primary_metric"]
    for point in (training.get("details") or {}).get("validations", []):
        step = int(point["step"])
        if metric in point:
            mlflow.log_metric(f"curve/validation_{metric}", point[metric], step, model_id=model_id)
        if "train_loss" in point:
            mlflow.log_metric("curve/train_loss", point["train_loss"], step, model_id=model_id)
    for name, (artifact, record) in _STEP_RECORDS.items():
        path = paths[artifact] / record
        seconds = storage.read_json(path).get("seconds") if path.is_file() else None
        if isinstance(seconds, int | float):
            mlflow.log_metric(f"step_seconds/{name}", float(seconds))


def _delete_versions(client: Any, name: str, run_id: str, version: Any | None) -> None:
    """Delete what run ``run_id`` registered: ``version``, or when its number never came back
    (SIGTERM or a lost answer after the server created it) the versions found by the run."""
    try:
        numbers = (
            [str(version.version)]
            if version is not None
            else [
                str(v.version)
                for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            ]
        )
    except Exception as exc:  # the original error matters more than the cleanup's
        log.error("could not look for versions of %s that run %s registered: %s", name, run_id, exc)
        return
    for number in numbers:
        try:
            client.delete_model_version(name, number)
            log.warning("deleted half-registered version %s of %s", number, name)
        except Exception as exc:
            log.error("could not delete version %s of %s: %s", number, name, exc)


# What a full disk (or quota, or file size limit) raises.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclasses.dataclass
class _Attempt:
    """What this registration attempt created, undone if it fails before it stands."""

    run_id: str | None = None
    version: Any | None = None
    sweep_run_id: str | None = None
    stands: bool = False  # the champion decision is applied: nothing is undone any more


@contextlib.contextmanager
def _undone_on_failure(client: Any, name: str) -> Iterator[_Attempt]:
    """Undo the attempt on any failure inside, SIGTERM (Terminated) included: every run this
    process left open ends FAILED, and a version the attempt registered is deleted and its
    run (closed FINISHED) marked FAILED. Enter it under the promotion lock, so no other
    registration sees the version meanwhile."""
    import mlflow

    attempt = _Attempt()
    try:
        yield attempt
    except BaseException:
        while mlflow.active_run() is not None:  # struck inside start_run or _log_run's body
            try:
                mlflow.end_run("FAILED")  # pops the run first: the loop ends
            except Exception as exc:
                log.error("could not mark an MLflow run FAILED: %s", exc)
        if not attempt.stands and attempt.run_id is not None:
            _delete_versions(client, name, attempt.run_id, attempt.version)
            for run_id in (attempt.run_id, attempt.sweep_run_id):
                if run_id is not None:
                    try:
                        client.set_terminated(run_id, "FAILED")
                    except Exception as exc:
                        log.error("could not mark MLflow run %s FAILED: %s", run_id, exc)
        raise


def _fail_abandoned(client: Any, config: PipelineConfig, holder: str) -> None:
    """The runs a killed registration (whose lock was broken) left RUNNING end FAILED, and
    the versions they registered are deleted: none of them got as far as the promotion."""
    experiment = client.get_experiment_by_name(config.registry.experiment)
    if experiment is None:
        return
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{TAG}pipeline_run_id` = '{holder}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        _delete_versions(client, config.registry.model_name, run.info.run_id, None)
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning(
            "marked MLflow run %s of the killed registration %s FAILED", run.info.run_id, holder
        )


def _log_drift_reference(
    model: Any, tokenizer: Any, card: Any, dataset_dir: Path, config: PipelineConfig
) -> None:
    """A seeded sample of the training inputs, embedded by the model's encoder, for
    `transferkit trigger`'s drift test (see transferkit.drift)."""
    import mlflow

    from transferkit.backbones.text import resolve_precision
    from transferkit.drift import REFERENCE_PATH, REFERENCE_ROWS, sample_rows
    from transferkit.training.model import embed
    from transferkit.training.runtime import device

    modality = card.input_modality()
    inputs, _ = modality.load(dataset_dir, "train")
    rows = sample_rows(len(inputs), REFERENCE_ROWS)
    sample = modality.subset(inputs, rows)
    precision = resolve_precision(config.evaluation.precision, device())
    vectors = embed(model, tokenizer, card, sample, config.evaluation.batch_size, precision)
    with tempfile.TemporaryDirectory(prefix="transferkit-drift-") as scratch:
        path = Path(scratch) / Path(REFERENCE_PATH).name
        # Through Python's write: numpy's own writer reports a full disk as a short write
        # with no errno, which no caller can tell from any other failure.
        buffer = io.BytesIO()
        np.save(buffer, vectors.astype(np.float32))
        path.write_bytes(buffer.getvalue())
        mlflow.log_artifact(str(path), artifact_path=str(Path(REFERENCE_PATH).parent))


def _promotion(
    config: PipelineConfig,
    champion: Any | None,
    existing: Any | None,
    dataset_dir: Path,
    evaluation_dir: Path,
    evaluation: dict[str, Any],
    selected: dict[str, Any] | None,
    margin: float | None,
) -> tuple[bool, str, PairedComparison | None]:
    """Whether the new model takes 'champion', why, and the paired comparison behind it.

    ``selected`` and ``margin``: the sweep's selected branch and margin (None: no sweep).
    """
    comparison = None
    if champion is None:
        promote, reason = True, "no champion yet"
    elif existing is not None and str(champion.version) == str(existing.version):
        promote, reason = True, "already the champion"
    else:
        try:
            comparison = compare_with_champion(
                config,
                champion,
                dataset_dir,
                evaluation_dir,
                evaluation["scores"].get("labels", [SCORE]),  # a regression's one output
            )
            promote, reason = decide(comparison, str(champion.version), config)
        except _IncomparableError as exc:
            promote, reason = False, f"{exc}; compare them by hand"
    if promote and selected and selected["negative_transfer"]:
        promote, reason = (
            False,
            f"negative transfer: {selected['name']} beats scratch at the same label budget by "
            f"{selected['delta_vs_scratch']:+.4f}, not more than the sweep margin "
            f"{margin:g} (before it: {reason})",
        )
    if promote and not config.registry.promote:
        promote, reason = False, reason + "; registry.promote is off"
    return promote, reason, comparison


def register_model(
    config: PipelineConfig,
    dataset_dir: Path,
    backbone_dir: Path,
    model_dir: Path,
    evaluation_dir: Path,
    pipeline_run_id: str,
    output_path: Path,
    mlflow_run_id: str | None = None,
) -> RegistrationResult:
    """Log, register and (when better) promote the model; write the result as JSON.

    Args:
        config: the run configuration (``registry``).
        dataset_dir: the ingest_data artifact (fingerprint, label map, stats).
        backbone_dir: the fetch_backbone artifact (fingerprint, provenance).
        model_dir: the train artifact.
        evaluation_dir: the evaluate artifact.
        pipeline_run_id: KFP run id, recorded as a tag.
        output_path: JSON file with the RegistrationResult, written last and atomically.
        mlflow_run_id: the pipeline run's MLflow run (transferkit.tracking.open_run), which
            the model is logged into (a sweep's: the parent of the branches' runs); None: a
            run of its own.

    Raises:
        RegistryError: MLflow could not be reached or refused the registration; nothing
            stays registered.
    """
    from mlflow.exceptions import MlflowException

    from transferkit.training.model import model_fingerprint

    started = time.perf_counter()
    name = config.registry.model_name
    evaluation = storage.read_json(evaluation_dir / "evaluation.json")
    training = storage.read_json(model_dir / "training.json")
    metric = config.evaluation.primary_metric
    metrics = _metrics(evaluation, training)
    value = metrics[f"test_{metric}"]
    fingerprint = model_fingerprint(model_dir)
    stats = storage.read_json(dataset_dir / "stats.json")
    sweep = read_sweep(evaluation_dir)
    selected = None
    if sweep is not None:
        selected = next(row for row in sweep["branches"] if row["name"] == sweep["selected"])
    tags = {
        TAG + "model_fingerprint": fingerprint,
        TAG + "data_fingerprint": stats["fingerprint"],
        # The stamp of the data sources (S3 ETags): what `transferkit trigger` compares.
        TAG + "data_stamp": stats.get("source_stamp", ""),
        TAG + "backbone_fingerprint": storage.read_json(backbone_dir / "backbone.json")[
            "fingerprint"
        ],
        TAG + "strategy": config.strategy.name,
        TAG + "pipeline_run_id": pipeline_run_id,
        TAG + "primary_metric": metric,
        TAG + f"test_{metric}": f"{value:.6f}",
    }
    if selected is not None:
        tags.update(_branch_tags(selected, pipeline_run_id))
    registry = config.registry
    with sigterm_raises(f"the registration of '{name}'"), http_policy(config):
        try:
            client = _client(config)
            with (
                promotion_lock(
                    client, name, pipeline_run_id, registry.lock_timeout, lease=registry.lock_lease
                ) as lock,
                _undone_on_failure(client, name) as attempt,
            ):
                for dead in lock.broken:
                    _fail_abandoned(client, config, dead)
                existing = _find_version(client, name, fingerprint)
                champion = _champion(client, name)
                previous = None if champion is None else str(champion.version)
                promote, reason, comparison = _promotion(
                    config,
                    champion,
                    existing,
                    dataset_dir,
                    evaluation_dir,
                    evaluation,
                    selected,
                    sweep["margin"] if sweep else None,
                )
                if comparison is not None:
                    metrics.update(
                        {
                            f"champion_{metric}_same_rows": comparison.champion,
                            "gate_gain": comparison.gain,
                            "gate_p_value": comparison.p_value,
                            "gate_ci_low": comparison.ci_low,
                            "gate_ci_high": comparison.ci_high,
                        }
                    )
                tags[TAG + "gate"] = registry.gate
                verdict = "promoted: " if promote else "held: "
                tags[TAG + "gate_decision"] = verdict + reason[:4000]
                sweep_run_id = None
                if existing is not None:
                    run_id, version, reused = existing.run_id, existing, True
                    log.info("identical model already registered as %s v%s", name, version.version)
                    if mlflow_run_id:
                        _record_reuse(client, mlflow_run_id, tags, metrics, existing)
                    stamp = tags[TAG + "data_stamp"]
                    if stamp and existing.tags.get(TAG + "data_stamp") != stamp:
                        # The same weights from other sources: the trigger compares the
                        # champion's stamp with the sources, which this model now matches.
                        client.set_model_version_tag(
                            name, existing.version, TAG + "data_stamp", stamp
                        )
                else:
                    paths = {
                        "model": model_dir,
                        "evaluation": evaluation_dir,
                        "dataset": dataset_dir,
                        "backbone": backbone_dir,
                    }
                    experiment_id = _experiment(client, config)
                    run_id, version, sweep_run_id = _log_run(
                        config, client, experiment_id, paths, tags, metrics, mlflow_run_id
                    )
                    attempt.run_id, attempt.version = run_id, version
                    attempt.sweep_run_id, reused = sweep_run_id, False
                result = RegistrationResult(
                    model_name=name,
                    version=str(version.version),
                    model_uri=f"models:/{name}/{version.version}",
                    champion_uri=f"models:/{name}@champion",
                    run_id=run_id,
                    tracking_uri=redact(config.tracking_uri),
                    champion=promote,
                    reason=reason,
                    previous_champion=previous,
                    metrics=metrics,
                    scores=evaluation["scores"],
                    comparison=comparison,
                    reused=reused,
                    seconds=round(time.perf_counter() - started, 3),
                    sweep_run_id=sweep_run_id,
                )
                # The result is written before the champion moves, and moved into place
                # after: a full disk fails the step here, with nothing promoted.
                with storage.atomic_file(output_path) as staged:
                    storage.write_json(staged, result.model_dump())
                    lock.check()
                    if promote and previous != str(version.version):
                        client.set_registered_model_alias(name, "champion", version.version)
                    attempt.stands = True
        except (MlflowException, ConnectionError) as exc:
            raise _registry_error(config, exc) from None
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise RegistryError(
                    f"the registration of '{name}' failed writing "
                    f"{exc.filename or 'a file'}: {exc.strerror}; free space on that "
                    "volume (or TMPDIR), then retry the run"
                ) from None
            raise
    log.info(
        "registered %s version %s (%s): %s",
        name,
        result.version,
        "champion" if promote else "challenger",
        reason,
    )
    return result
