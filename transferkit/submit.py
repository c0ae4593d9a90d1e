"""Runs on a Kubeflow Pipelines installation: one run now (submit) or a recurring run (schedule).

Both compile the pipeline with the config's resources, placement and Secrets (as
``transferkit compile`` does) and send it through the KFP client's v2beta1 REST API; the
config travels as the run's ``config`` parameter. Pods cannot read files on the submitting
machine, so every source must be an ``s3://`` URI or a packaged backbone.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit import storage
from transferkit.backbones.hub import is_hub_uri
from transferkit.config import PipelineConfig
from transferkit.errors import ConfigError, TransferkitError
from transferkit.step_inputs import step_arguments


class SubmitError(TransferkitError):
    """The KFP server refused or could not be reached."""


@dataclass(frozen=True)
class Submitted:
    """What the server created and where to see it."""

    id: str
    experiment_id: str
    url: str


def sources(config: PipelineConfig) -> list[tuple[str, str]]:
    """Every URI the pods will read, with the config key that names it."""
    data = config.data
    found = [
        (f"data.{key}", getattr(data, key))
        for key in ("uri", "train_uri", "validation_uri", "test_uri")
        if getattr(data, key)
    ]
    if config.backbone_selection is not None:
        found += [
            (f"backbone_selection.candidates[{i}].uri", c.uri)
            for i, c in enumerate(config.backbone_selection.candidates)
        ]
    else:
        found.append(("backbone.uri", config.backbone.uri))
    strategies = [b.strategy for b in config.sweep.branches] if config.sweep else []
    for strategy in [config.strategy, *strategies]:
        unlabelled = getattr(strategy, "unlabelled_uri", None)
        if unlabelled:
            found.append(("strategy.unlabelled_uri", unlabelled))
    return found


def check_cluster_sources(config: PipelineConfig) -> None:
    """Refuse sources that exist only on this machine.

    Raises:
        ConfigError: a source is a local path (one line: which key, and the fix).
    """
    for key, uri in sources(config):
        if is_hub_uri(uri):
            continue  # the pods fetch it from the Hub (HF_ENDPOINT, HF_TOKEN in their env)
        if storage.parse(uri).scheme == "file":
            raise ConfigError(
                f"{key} is a path on this machine ({uri}); cluster pods cannot read it — "
                "upload it to object storage and give its s3:// URI"
            )


def kfp_cron(expression: str) -> str:
    """A cron expression in KFP's six-field form (seconds first).

    Standard five-field expressions ('0 3 * * 1': 03:00 every Monday) get a leading '0'.

    Raises:
        ConfigError: not five or six fields of cron syntax.
    """
    fields = expression.split()
    field = r"^[0-9A-Za-z*?/,\-LW#]+$"
    if len(fields) not in (5, 6) or not all(re.match(field, f) for f in fields):
        raise ConfigError(
            f"--cron {expression!r} is not a cron expression; give five fields, e.g. "
            "'0 3 * * 1' for 03:00 every Monday"
        )
    return " ".join(["0", *fields] if len(fields) == 5 else fields)


def _client(host: str) -> Any:
    from kfp import Client

    try:
        return Client(host=host)
    except Exception as exc:  # the client raises plain exceptions on connection errors
        raise SubmitError(f"cannot reach Kubeflow Pipelines at {host}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _experiment_id(client: Any, name: str) -> str:
    try:
        return str(client.create_experiment(name).experiment_id)  # returns it when it exists
    except Exception as exc:
        raise SubmitError(f"cannot create or find experiment {name!r}: {_reason(exc)}") from exc


@contextmanager
def _session(
    config: PipelineConfig, host: str, experiment: str, what: str
) -> Iterator[tuple[Any, str, str]]:
    """The client, the experiment's id and the compiled package of ``config``; an error the
    server raises inside the block becomes one line saying it refused ``what``."""
    from kfp import compiler

    from transferkit.pipelines import build_for

    client = _client(host)
    experiment_id = _experiment_id(client, experiment)
    with tempfile.TemporaryDirectory(prefix="transferkit-submit-") as folder:
        package = str(Path(folder) / "pipeline.yaml")
        compiler.Compiler().compile(build_for(config), package)
        try:
            yield client, experiment_id, package
        except Exception as exc:
            raise SubmitError(
                f"Kubeflow Pipelines at {host} refused the {what}: {_reason(exc)}"
            ) from exc


def submit(
    config: PipelineConfig,
    host: str,
    experiment: str,
    run_name: str | None = None,
    stamps: bool = True,
) -> Submitted:
    """Compile and start one run of ``config``.

    ``stamps`` hashes the sources (S3 ETags) so that changed bytes behind an unchanged URI miss
    the KFP cache; without it (the submitting machine cannot read the data) the run does not
    use the cache at all.

    Raises:
        ConfigError: a source is local to this machine.
        SubmitError: the server could not be reached or refused the run.
    """
    from transferkit.runner import source_stamps

    check_cluster_sources(config)
    data_stamp, backbone_stamp = source_stamps(config) if stamps else ("", "")
    with _session(config, host, experiment, "run") as (client, experiment_id, package):
        result = client.create_run_from_pipeline_package(
            package,
            arguments={
                **step_arguments(config),
                "data_stamp": data_stamp,
                "backbone_stamp": backbone_stamp,
            },
            run_name=run_name or f"{config.registry.model_name}-{config.strategy.name}",
            experiment_id=experiment_id,
            enable_caching=config.runtime.caching and stamps,
            service_account=config.kubernetes.service_account,
        )
    run_id = str(result.run_id)
    return Submitted(run_id, experiment_id, f"{host.rstrip('/')}/#/runs/details/{run_id}")


def schedule(
    config: PipelineConfig,
    host: str,
    cron: str,
    experiment: str,
    name: str | None = None,
    max_concurrency: int = 1,
) -> Submitted:
    """Create a recurring run of ``config`` on ``cron``.

    Every scheduled run must see the data as it is then, behind the same URIs: scheduled runs
    do not use the KFP cache (features are still reused by content, in the feature cache).

    Raises:
        ConfigError: a source is local to this machine, or the cron expression is invalid.
        SubmitError: the server could not be reached or refused the schedule.
    """
    check_cluster_sources(config)
    expression = kfp_cron(cron)
    with _session(config, host, experiment, "schedule") as (client, experiment_id, package):
        created = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=name or f"{config.registry.model_name}-retrain",
            cron_expression=expression,
            max_concurrency=max_concurrency,
            no_catchup=True,
            params={**step_arguments(config), "data_stamp": "", "backbone_stamp": ""},
            pipeline_package_path=package,
            enable_caching=False,
            service_account=config.kubernetes.service_account,
        )
    job_id = str(created.recurring_run_id)
    return Submitted(job_id, experiment_id, f"{host.rstrip('/')}/#/recurringrun/details/{job_id}")
