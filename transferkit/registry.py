"""register_model: an MLflow run, a registered model version, and the champion decision.

The run records the flattened config as params, the evaluation metrics, the report, plot,
label map and config as artifacts, and the model as a pyfunc with a signature and an input
example. The new version gets alias ``challenger``; it becomes ``champion`` only when it
beats the current champion's primary metric (or there is none). Registration is
all-or-nothing: if anything fails after the version was created, the version is deleted.
Registering the same model bytes twice reuses the existing version.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel

from transferkit import storage
from transferkit.config import PipelineConfig, flatten
from transferkit.errors import RegistryError

log = logging.getLogger(__name__)

TAG = "transferkit."
MAX_PARAM = 6000  # MLflow's limit on a param value
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
    reused: bool
    seconds: float


def redact(uri: str) -> str:
    """A URI without user:password, safe for logs, tags and outputs."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def _client(config: PipelineConfig) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def _experiment(client: Any, config: PipelineConfig) -> str:
    """Experiment id, created on first use; local stores keep artifacts in the work dir."""
    existing = client.get_experiment_by_name(config.registry.experiment)
    if existing is not None:
        return str(existing.experiment_id)
    location = None
    if not config.tracking_uri.startswith(("http://", "https://", "databricks")):
        location = (Path(config.runtime.work_dir).absolute() / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(config.registry.experiment, artifact_location=location))
    except Exception:
        # Another run created it in the meantime.
        found = client.get_experiment_by_name(config.registry.experiment)
        if found is None:
            raise
        return str(found.experiment_id)


def _find_version(client: Any, name: str, fingerprint: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(
            f"name = '{name}' and tags.`{TAG}model_fingerprint` = '{fingerprint}'"
        )
    except MlflowException:
        return None
    ready = [v for v in versions if v.status == "READY"]
    return min(ready, key=lambda v: int(v.version)) if ready else None


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def _champion_value(client: Any, champion: Any, metric: str) -> float | None:
    tagged = champion.tags.get(f"{TAG}test_{metric}")
    if tagged is not None:
        return float(tagged)
    value = client.get_run(champion.run_id).data.metrics.get(f"test_{metric}")
    return None if value is None else float(value)


def _metrics(evaluation: dict[str, Any], training: dict[str, Any]) -> dict[str, float]:
    scores = evaluation["scores"]
    metrics = {"test_accuracy": scores["accuracy"], "test_macro_f1": scores["macro_f1"]}
    for name, cls in scores["per_class"].items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        metrics[f"test_f1_{safe}"] = cls["f1"]
        metrics[f"test_recall_{safe}"] = cls["recall"]
    metrics["validation_" + training["primary_metric"]] = training["validation_metric"]
    metrics["train_seconds"] = training["seconds"]
    metrics["trainable_parameters"] = float(training["trainable_parameters"])
    return {k: float(v) for k, v in metrics.items()}


def _log_run(
    config: PipelineConfig,
    client: Any,
    experiment_id: str,
    paths: dict[str, Path],
    tags: dict[str, str],
    metrics: dict[str, float],
) -> tuple[str, Any]:
    """Log the run and register a version; delete the version again if anything fails."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from transferkit.serving import predictions_frame
    from transferkit.training.model import load_classifier, predict_proba

    model_dir = paths["model"]
    version = None
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"{config.strategy.name}-{tags[TAG + 'pipeline_run_id']}"[:250],
        tags=tags,
    ) as run:
        try:
            params = {k: v[:MAX_PARAM] for k, v in flatten(config).items()}
            mlflow.log_params(params)
            mlflow.log_metrics(metrics)
            for name in ("report.md", "confusion_matrix.png", "evaluation.json"):
                mlflow.log_artifact(str(paths["evaluation"] / name), artifact_path="evaluation")
            for name in ("label_map.json", "stats.json"):
                mlflow.log_artifact(str(paths["dataset"] / name), artifact_path="data")
            mlflow.log_artifact(str(paths["backbone"] / "backbone.json"), artifact_path="data")
            mlflow.log_artifact(str(model_dir / "training.json"), artifact_path="evaluation")
            mlflow.log_text(
                yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml"
            )

            tokenizer, model, card = load_classifier(model_dir)
            example = pd.DataFrame({"text": ["An example input text.", "Another one."]})
            output = predictions_frame(
                predict_proba(model, tokenizer, card, example["text"].tolist()), card.labels
            )
            info = mlflow.pyfunc.log_model(
                name="model",
                # Models from code: the entry file is stored, not a pickle of an object.
                python_model=str(PYFUNC_ENTRY),
                artifacts={"model": str(model_dir)},
                signature=infer_signature(example, output, params={"batch_size": 64}),
                input_example=example,
                pip_requirements=_requirements(),
            )
            version = mlflow.register_model(info.model_uri, config.registry.model_name, tags=tags)
            client.set_registered_model_alias(
                config.registry.model_name, "challenger", version.version
            )
        except Exception:
            if version is not None:
                _delete_version(client, config.registry.model_name, version.version)
            raise
    return run.info.run_id, version


def _delete_version(client: Any, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
        log.warning("deleted half-registered version %s of %s", version, name)
    except Exception as exc:  # the original error matters more than the cleanup's
        log.error("could not delete version %s of %s: %s", version, name, exc)


def _requirements() -> list[str]:
    """What serving the model needs; pinned to what trained it."""
    import mlflow
    import torch
    import transformers

    from transferkit import __version__

    return [
        f"transferkit=={__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"mlflow=={mlflow.__version__}",
        "safetensors",
        "pandas",
        "numpy",
    ]


def register_model(
    config: PipelineConfig,
    dataset_dir: Path,
    backbone_dir: Path,
    model_dir: Path,
    evaluation_dir: Path,
    pipeline_run_id: str,
    output_path: Path,
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

    Raises:
        RegistryError: MLflow could not be reached or refused the registration; nothing
            stays registered.
    """
    from mlflow.exceptions import MlflowException

    started = time.perf_counter()
    name = config.registry.model_name
    evaluation = storage.read_json(evaluation_dir / "evaluation.json")
    training = storage.read_json(model_dir / "training.json")
    metric = config.evaluation.primary_metric
    metrics = _metrics(evaluation, training)
    value = metrics[f"test_{metric}"]
    fingerprint = storage.sha256_tree(model_dir)
    tags = {
        TAG + "model_fingerprint": fingerprint,
        TAG + "data_fingerprint": storage.read_json(dataset_dir / "stats.json")["fingerprint"],
        TAG + "backbone_fingerprint": storage.read_json(backbone_dir / "backbone.json")[
            "fingerprint"
        ],
        TAG + "strategy": config.strategy.name,
        TAG + "pipeline_run_id": pipeline_run_id,
        TAG + "primary_metric": metric,
        TAG + f"test_{metric}": f"{value:.6f}",
    }
    try:
        client = _client(config)
        existing = _find_version(client, name, fingerprint)
        if existing is not None:
            run_id, version, reused = existing.run_id, existing, True
            log.info("identical model already registered as %s version %s", name, version.version)
        else:
            experiment_id = _experiment(client, config)
            run_id, version = _log_run(
                config,
                client,
                experiment_id,
                {
                    "model": model_dir,
                    "evaluation": evaluation_dir,
                    "dataset": dataset_dir,
                    "backbone": backbone_dir,
                },
                tags,
                metrics,
            )
            reused = False
        champion = _champion(client, name)
        previous = None if champion is None else str(champion.version)
        if champion is not None and str(champion.version) == str(version.version):
            promote, reason = True, "already the champion"
        elif champion is None:
            promote, reason = True, "no champion yet"
        else:
            current = _champion_value(client, champion, metric)
            if current is None:
                promote, reason = False, f"champion v{champion.version} has no test_{metric}"
            else:
                gain = value - current
                promote = gain > config.registry.min_improvement
                reason = (
                    f"{metric} {value:.4f} vs champion v{champion.version} {current:.4f} "
                    f"(gain {gain:+.4f}, needs > {config.registry.min_improvement:g})"
                )
        if promote and not config.registry.promote:
            promote, reason = False, reason + "; registry.promote is off"
        if promote and previous != str(version.version):
            client.set_registered_model_alias(name, "champion", version.version)
    except (MlflowException, ConnectionError) as exc:
        # MLflow's own message may embed the tracking URI with credentials: never repeat it.
        where = redact(config.tracking_uri)
        text = str(exc)
        if isinstance(exc, ConnectionError) or any(
            marker in text
            for marker in (
                "Failed to establish",
                "Max retries exceeded",
                "Connection refused",
                "Read timed out",
            )
        ):
            raise RegistryError(
                f"MLflow at {where} is unreachable; check registry.tracking_uri and that the "
                "server is running, then retry the run"
            ) from None
        raise RegistryError(
            f"MLflow at {where} refused the registration of '{name}' "
            f"({getattr(exc, 'error_code', type(exc).__name__)}); check the server logs"
        ) from None
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
        reused=reused,
        seconds=round(time.perf_counter() - started, 3),
    )
    storage.write_json(output_path, result.model_dump())
    log.info(
        "registered %s version %s (%s): %s",
        name,
        result.version,
        "champion" if promote else "challenger",
        reason,
    )
    return result
