"""Retraining triggers: decide whether the champion is stale, and retrain only then.

``transferkit trigger CONFIG`` checks, against the champion registered under
``registry.model_name``:

- **data**: the stamp of the data sources now (S3: ETags and sizes of every object under each
  data URI; local: sha256) against the stamp the champion was trained from (recorded by
  ingest, tagged on the model version at registration);
- **drift** (``trigger.drift``): recent inputs against a sample of the champion's training
  inputs, both embedded by the champion's encoder (transferkit.drift);
- **age** (``trigger.max_age_days``): how long ago the champion version was registered.

No champion at all also fires. When a check fires, the trigger submits a KFP run (``--host``)
or runs the pipeline here (``--local``), and records what it fired for — a hash of the state
it saw (champion version, data stamp, recent-data stamp, age verdict) — as a tag of the
registered model. Run again on the same state, it does nothing: idempotent. A run that failed
(local: nothing was recorded; KFP: the recorded run's state is FAILED or CANCELED) is retried
on the next call.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.errors import TransferkitError
from transferkit.registry import http_policy

STATE_TAG = "transferkit.trigger_state"
RETRY_STATES = {"FAILED", "CANCELED", "CANCELING", "SKIPPED"}


class TriggerError(TransferkitError):
    """The trigger could not decide (MLflow, KFP or a source unreachable)."""


@dataclass(frozen=True)
class Check:
    """One reason to retrain, and whether it holds."""

    name: str
    fired: bool
    detail: str


@dataclass
class Decision:
    """What the trigger saw and what it did."""

    checks: list[Check]
    state: str
    champion: str | None
    action: str = ""  # 'none', 'skipped', 'submitted', 'ran'
    detail: str = ""
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def fire(self) -> bool:
        return any(c.fired for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [c.name for c in self.checks if c.fired]


def _drift_check(config: PipelineConfig, champion: Any, scratch: Path) -> tuple[Check, str]:
    """The drift check and the stamp of the recent data."""
    import mlflow
    import numpy as np

    from transferkit.backbones.text import resolve_precision
    from transferkit.drift import REFERENCE_PATH, mmd_test, read_recent
    from transferkit.registry import load_version
    from transferkit.training.model import embed
    from transferkit.training.runtime import device

    drift = config.trigger.drift
    assert drift is not None
    recent_stamp = storage.stamp(drift.uri, config.storage)
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=champion.run_id, artifact_path=REFERENCE_PATH, dst_path=str(scratch / "ref")
        )
    except Exception:
        return (
            Check(
                "drift",
                False,
                "skipped: the champion has no drift reference (registered "
                "by an older transferkit); the next registered version will have one",
            ),
            recent_stamp,
        )
    reference = np.load(path)
    try:
        tokenizer, model, card = load_version(
            config.registry.model_name, champion, scratch / "model"
        )
    except ValueError as exc:
        raise TriggerError(f"cannot test drift: {exc}") from None
    recent = read_recent(drift, card.input_modality(), config.storage, pairs=card.pair)
    precision = resolve_precision(config.evaluation.precision, device())
    vectors = embed(model, tokenizer, card, recent, config.evaluation.batch_size, precision)
    result = mmd_test(reference, vectors)
    fired = result.mmd2 > drift.threshold
    return (
        Check(
            "drift",
            fired,
            f"MMD² {result.mmd2:.4f} {'>' if fired else '≤'} {drift.threshold:g} "
            f"(p {result.p_value:.3f}; {result.reference_rows} training vs "
            f"{result.recent_rows} recent inputs)",
        ),
        recent_stamp,
    )


def decide(config: PipelineConfig, now: float | None = None) -> Decision:
    """Run every enabled check against the current champion.

    Raises:
        TriggerError: MLflow unreachable.
        StorageError, DataError: a data source or the recent data cannot be read.
    """
    from transferkit.data.ingest import data_stamp
    from transferkit.registry import TAG, _champion, _client

    now = time.time() if now is None else now
    name = config.registry.model_name
    try:
        client = _client(config)
        champion = _champion(client, name)
    except Exception as exc:
        raise TriggerError(_mlflow_error(config, exc)) from None
    checks: list[Check] = []
    state: list[str] = [f"champion={champion.version if champion else 'none'}"]
    if champion is None:
        checks.append(Check("champion", True, f"no champion of {name} yet"))
    else:
        registered = datetime.fromtimestamp(champion.creation_timestamp / 1000, UTC)
        checks.append(
            Check("champion", False, f"{name} v{champion.version}, registered {registered:%F %T}")
        )
    trigger = config.trigger
    if trigger.data_changed:
        stamp = data_stamp(config)
        state.append(f"data={stamp}")
        if champion is not None:
            recorded = champion.tags.get(TAG + "data_stamp", "")
            if not recorded:
                checks.append(Check("data", True, "the champion recorded no data stamp"))
            elif recorded != stamp:
                checks.append(
                    Check(
                        "data",
                        True,
                        f"changed since the champion: {_short(recorded)} → {_short(stamp)}",
                    )
                )
            else:
                checks.append(Check("data", False, f"unchanged ({_short(stamp)})"))
    if trigger.drift is not None and champion is not None:
        with tempfile.TemporaryDirectory(prefix="transferkit-trigger-") as scratch:
            check, recent_stamp = _drift_check(config, champion, Path(scratch))
        checks.append(check)
        state.append(f"recent={recent_stamp}")
    if trigger.max_age_days is not None and champion is not None:
        age = (now - champion.creation_timestamp / 1000) / 86400
        old = age > trigger.max_age_days
        checks.append(
            Check("age", old, f"{age:.1f} days {'>' if old else '≤'} {trigger.max_age_days:g}")
        )
        state.append(f"aged={old}")
    digest = hashlib.sha256("\n".join(state).encode()).hexdigest()
    return Decision(checks, digest, None if champion is None else str(champion.version))


def _short(stamp: str) -> str:
    return ",".join(part[:12] for part in stamp.split(","))


def _mlflow_error(config: PipelineConfig, exc: Exception) -> str:
    from transferkit.registry import redact

    return (
        f"MLflow at {redact(config.tracking_uri)} did not answer ({type(exc).__name__}); "
        "check registry.tracking_uri and that the server is running"
    )


def _recorded(config: PipelineConfig) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    from transferkit.registry import _client

    try:
        model = _client(config).get_registered_model(config.registry.model_name)
    except MlflowException:
        return {}
    raw = model.tags.get(STATE_TAG)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def _record(config: PipelineConfig, decision: Decision, what: dict[str, Any]) -> None:
    from mlflow.exceptions import MlflowException

    from transferkit.registry import _client

    client = _client(config)
    name = config.registry.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    record = {
        "state": decision.state,
        "reasons": decision.reasons,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        **what,
    }
    client.set_registered_model_tag(name, STATE_TAG, json.dumps(record, sort_keys=True))


def _previous_run_state(record: dict[str, Any]) -> str:
    """The KFP state of the run recorded for this state ('' when it cannot be known)."""
    from transferkit.submit import _client as kfp_client

    try:
        run = kfp_client(record["host"]).get_run(record["run_id"])
    except Exception as exc:
        raise TriggerError(
            f"cannot read run {record['run_id']} at {record['host']} ({type(exc).__name__}); "
            "check that Kubeflow Pipelines is reachable"
        ) from None
    return str(getattr(run, "state", "") or "")


def trigger(
    config: PipelineConfig,
    host: str | None = None,
    experiment: str = "transferkit",
    local: bool = False,
    dry_run: bool = False,
    now: float | None = None,
) -> Decision:
    """Decide, and retrain when a check fires and this state was not already retrained.

    Exactly one of ``host`` (submit a KFP run) and ``local`` (run the pipeline here) is used;
    ``dry_run`` only decides.

    Raises:
        TriggerError: MLflow or KFP unreachable.
        RunFailedError: the local run failed (nothing is recorded: the next call retries).
        SubmitError: KFP refused the run.
    """
    # Every MLflow call below (decide, the recorded state) under the registry's HTTP policy.
    with http_policy(config):
        decision = decide(config, now)
        if not decision.fire:
            decision.action, decision.detail = "none", "no retraining: every check passed"
            return decision
        record = _recorded(config)
        if record.get("state") == decision.state:
            if record.get("mode") == "local":
                decision.action = "skipped"
                decision.detail = (
                    f"already retrained for this state at {record.get('at')} "
                    f"(version {record.get('version')})"
                )
                return decision
            previous = _previous_run_state(record)
            if previous not in RETRY_STATES:
                decision.action = "skipped"
                decision.detail = (
                    f"already submitted for this state at {record.get('at')}: run "
                    f"{record.get('run_id')} is {previous or 'in an unknown state'}"
                )
                return decision
        if dry_run:
            decision.action, decision.detail = "none", "would retrain (--dry-run)"
            return decision
        why = "+".join(decision.reasons)
        if local:
            from transferkit.runner import run_local

            summary = run_local(config)
            _record(config, decision, {"mode": "local", "version": summary.version})
            decision.action = "ran"
            decision.detail = f"retrained ({why}): {summary.model_uri}" + (
                " is the new champion" if summary.champion else " (held: not the champion)"
            )
            decision.run = {"model_uri": summary.model_uri, "champion": summary.champion}
            return decision
        assert host is not None
        from transferkit.submit import submit

        name = f"{config.registry.model_name}-retrain-{why}"
        submitted = submit(config, host, experiment, run_name=name)
        _record(config, decision, {"mode": "kfp", "host": host, "run_id": submitted.id})
        decision.action = "submitted"
        decision.detail = f"retraining ({why}): run {submitted.id}: {submitted.url}"
        decision.run = {"run_id": submitted.id, "url": submitted.url}
        return decision
