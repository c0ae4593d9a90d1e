"""One MLflow run per pipeline run: opened by the pipeline's first step, closed by its exit step.

``open_run`` (the ``open_run`` step, before ingest) creates the run of a pipeline run, tagged
with the pipeline run id, with the flattened config as params and the system tags (source,
user, transferkit's version); a retried step finds the run it created. Registration logs into
that run (a sweep's branches as its children, see ``transferkit.registry``). ``close_run`` (the
exit step, which runs whether the DAG succeeded or not) ends it: FINISHED, or FAILED with the
error. KFP's final status says only which task failed, so the failed step's own one-line
error is recorded apart: by ``transferkit run`` after the run (``record_failure``), and on a
cluster by the failing step itself as its pod exits (``report_failures``; the pod knows its
pipeline run id and step from its labels).

The cached steps do not know the pipeline run id as an input (it would be in their cache key),
so nothing between the first step and registration talks to MLflow but a failing step.

The connection to MLflow (client, experiment, HTTP retries, one-line errors) lives here too,
for registration, the trigger and these two steps; MLflow itself is imported only when
called, so the two steps start quickly.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from transferkit import __version__
from transferkit.config import PipelineConfig, flatten
from transferkit.errors import RegistryError, TransferkitError

log = logging.getLogger(__name__)

TAG = "transferkit."
RUN_ID_TAG = TAG + "pipeline_run_id"
ROLE_TAG = TAG + "run_role"  # "pipeline": the run a pipeline run opened
ERROR_TAG = TAG + "error"
FAILED_STEP_TAG = TAG + "failed_step"
# `transferkit run` sets it in its steps' environment: the local run's stamp, tagged on the run
# so that the runner finds the run it started (KFP's local runner makes its own run id).
LOCAL_RUN_ENV = "TRANSFERKIT_LOCAL_RUN"
LOCAL_RUN_TAG = TAG + "local_run"
# A step's pod on a cluster (pipelines.wiring): the pipeline run id and the step from its labels
# (downward API), the MLflow to record a failure on from the compiled config.
PIPELINE_RUN_ENV = "TRANSFERKIT_PIPELINE_RUN_ID"
STEP_ENV = "TRANSFERKIT_STEP"
TRACKING_URI_ENV = "TRANSFERKIT_TRACKING_URI"
EXPERIMENT_ENV = "TRANSFERKIT_EXPERIMENT"
MAX_PARAM = 6000  # MLflow's limit on a param value
MAX_TAG = 5000
_ID = re.compile(r"[\w.:-]{1,250}")


def redact(uri: str) -> str:
    """A URI without user:password, safe for logs, tags and outputs."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


@contextlib.contextmanager
def http_policy(config: PipelineConfig) -> Iterator[None]:
    """MLflow's HTTP retries and timeout set from ``registry`` for the calls inside, then
    restored. MLflow reads them from its environment variables at every request, so that is
    where they are put (MLflow's defaults, 7 retries with backoff factor 2, wait ~4 min on a
    server that is down)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    settings = {
        MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: str(config.registry.http_retries),
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name: "1",
        MLFLOW_HTTP_REQUEST_TIMEOUT.name: str(config.registry.http_timeout),
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client(config: PipelineConfig) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    from transferkit import sqlite_store

    sqlite_store.prepare(config.tracking_uri)  # a new SQLite store without its migrations
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def experiment(client: Any, config: PipelineConfig) -> str:
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


# A server error or overload (5xx, 429): the same request may succeed a little later.
_TRANSIENT_MLFLOW_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
)


def registry_error(config: PipelineConfig, exc: Exception) -> RegistryError:
    """One line for a failed MLflow call: unreachable (after how many attempts; transient) or
    refused (transient only for a server error or overload). MLflow's own message may embed
    the tracking URI with credentials: it is never repeated."""
    where = redact(config.tracking_uri)
    text = str(exc)
    markers = (
        "Failed to establish",
        "Max retries exceeded",
        "Connection refused",
        "Read timed out",
    )
    if isinstance(exc, ConnectionError) or any(marker in text for marker in markers):
        tries = ""
        if config.tracking_uri.startswith(("http://", "https://")):
            attempts = config.registry.http_retries + 1
            tries = f" after {attempts} attempt{'s' if attempts > 1 else ''}"
        return RegistryError(
            f"MLflow at {where} is unreachable{tries}; check registry.tracking_uri and that the "
            "server is running, then retry the run",
            transient=True,
        )
    code = getattr(exc, "error_code", type(exc).__name__)
    return RegistryError(
        f"MLflow at {where} refused the registration of '{config.registry.model_name}' "
        f"({code}); check the server logs",
        transient=code in _TRANSIENT_MLFLOW_CODES,
    )


def run_name(config: PipelineConfig, pipeline_run_id: str) -> str:
    """The MLflow run name of a pipeline run: its strategy (or ``sweep``) and run id."""
    kind = "sweep" if config.sweep is not None else config.strategy.name
    return f"{kind}-{pipeline_run_id}"[:250]


def _find(client: Any, experiment_id: str, tag: str, value: str) -> Any | None:
    if not _ID.fullmatch(value):  # it goes into a filter string
        raise RegistryError(f"{tag} {value[:80]!r}: a run id is letters, digits, '.', '_', '-'")
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{tag}` = '{value}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    return runs[0] if runs else None


def open_run(config: PipelineConfig, pipeline_run_id: str, pipeline_name: str) -> str:
    """Create the MLflow run of this pipeline run (or find the one a retry left); its id.

    Raises:
        RegistryError: MLflow could not be reached or refused.
    """
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    try:
        with http_policy(config):
            mlflow_client = client(config)
            experiment_id = experiment(mlflow_client, config)
            found = _find(mlflow_client, experiment_id, RUN_ID_TAG, pipeline_run_id)
            if found is not None:
                log.info("MLflow run %s of pipeline run %s", found.info.run_id, pipeline_run_id)
                return str(found.info.run_id)
            tags = {
                RUN_ID_TAG: pipeline_run_id,
                ROLE_TAG: "pipeline",
                TAG + "version": __version__,
                TAG + "pipeline": pipeline_name,
                "mlflow.source.name": pipeline_name,
                "mlflow.source.type": "JOB",
                "mlflow.user": os.environ.get("POD_NAMESPACE") or _user(),
                TAG + "host": os.environ.get("POD_NAME") or socket.gethostname(),
            }
            if local := os.environ.get(LOCAL_RUN_ENV):
                tags[LOCAL_RUN_TAG] = local
            run = mlflow_client.create_run(
                experiment_id, run_name=run_name(config, pipeline_run_id), tags=tags
            )
            params = [Param(k, v[:MAX_PARAM]) for k, v in flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow's batch limit
                mlflow_client.log_batch(run.info.run_id, params=params[start : start + 100])
    except (MlflowException, ConnectionError) as exc:
        raise registry_error(config, exc) from None
    log.info("opened MLflow run %s for pipeline run %s", run.info.run_id, pipeline_run_id)
    return str(run.info.run_id)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (containers)
        return str(os.getuid())


def close_run(
    config: PipelineConfig, pipeline_run_id: str, state: str, error: str = "", step: str = ""
) -> str | None:
    """End the pipeline run's MLflow run: FINISHED when the DAG succeeded (registration
    usually ended it already), else FAILED with ``error``. The run's final status, or None
    where the first step never opened one."""
    return _close(config, RUN_ID_TAG, pipeline_run_id, state, error, step)


def record_failure(config: PipelineConfig, local_run: str, step: str, error: str) -> str | None:
    """`transferkit run`: put the failed step's own one-line error on the run it started."""
    return _close(config, LOCAL_RUN_TAG, local_run, "FAILED", error, step, overwrite=True)


def _close(
    config: PipelineConfig,
    tag: str,
    value: str,
    state: str,
    error: str,
    step: str,
    overwrite: bool = False,
) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        with http_policy(config):
            mlflow_client = client(config)
            found = _find(mlflow_client, experiment(mlflow_client, config), tag, value)
            if found is None:
                log.warning("no MLflow run of pipeline run %s to close", value)
                return None
            run_id, status = found.info.run_id, str(found.info.status)
            if state in ("SUCCEEDED", "SUCCESS"):
                if status == "RUNNING":
                    mlflow_client.set_terminated(run_id, "FINISHED")
                return "FINISHED" if status == "RUNNING" else status
            if overwrite or ERROR_TAG not in found.data.tags:
                message = error or f"the pipeline ended {state}"
                mlflow_client.set_tag(run_id, ERROR_TAG, message[:MAX_TAG])
                if step:
                    mlflow_client.set_tag(run_id, FAILED_STEP_TAG, step)
            if status != "FAILED":
                mlflow_client.set_terminated(run_id, "FAILED")
    except (MlflowException, ConnectionError) as exc:
        raise registry_error(config, exc) from None
    log.info("marked MLflow run %s FAILED", run_id)
    return "FAILED"


def one_line(error: BaseException) -> str:
    """An error as ``transferkit run`` reports a step's: a transferkit error's own message, any
    other as its type and first line (``ValueError: …``)."""
    if isinstance(error, TransferkitError):
        return str(error)
    kind = type(error)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{name}: {first}"[:MAX_TAG] if first else name


def report_failures() -> bool:
    """In a step's pod on a cluster: put an uncaught error on the pipeline run's MLflow run
    (``transferkit.error`` = ``<step> failed: <one line>``, ``transferkit.failed_step``, FAILED)
    after the traceback is printed. Active only where the pod's environment names the pipeline
    run and an MLflow (``pipelines.wiring``); a local run records it from its runner instead.
    A SIGTERM (``errors.Terminated``) is a stop, not an error: close_run records how it ended.
    Whether it was installed."""
    run_id = os.environ.get(PIPELINE_RUN_ENV, "")
    uri = os.environ.get(TRACKING_URI_ENV) or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not run_id or not uri:
        return False
    step = os.environ.get(STEP_ENV) or "a step"
    experiment_name = os.environ.get(EXPERIMENT_ENV) or "transferkit"
    previous = sys.excepthook
    if getattr(previous, "transferkit_reports", False):  # configure_logging ran twice
        return True

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        previous(kind, error, trace)
        if not isinstance(error, Exception):
            return
        try:
            record_step_failure(uri, experiment_name, run_id, step, one_line(error))
        except Exception as exc:  # the step's own error is already printed; it matters more
            log.warning("could not record the failure on the MLflow run: %s", one_line(exc))

    hook.transferkit_reports = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    return True


def record_step_failure(
    uri: str, experiment_name: str, pipeline_run_id: str, step: str, error: str
) -> str | None:
    """The failed step's one-line error on the MLflow run of ``pipeline_run_id``, unless a
    step recorded one first (a sweep's branches may fail together; the first is the cause).
    One attempt per request, 10 s each: the pod is on its way out. Its final status, or None
    where open_run never opened the run."""
    from transferkit.config import RegistryConfig, RuntimeConfig

    # Only the registry's connection settings are read (client, experiment, http_policy): the
    # step's config (data and all) is not at hand in the excepthook, nor needed.
    parts: dict[str, Any] = {
        "registry": RegistryConfig(
            tracking_uri=uri, experiment=experiment_name, http_retries=0, http_timeout=10
        ),
        "runtime": RuntimeConfig(),
    }
    config = PipelineConfig.model_construct(**parts)
    return _close(config, RUN_ID_TAG, pipeline_run_id, "FAILED", f"{step} failed: {error}", step)
