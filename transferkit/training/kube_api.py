"""The launcher's two calls to the Kubernetes API (create and get a TrainJob), through the
``kubernetes`` client, with every error answer turned into one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from transferkit.errors import TrainingError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"


class TrainJobApi(Protocol):
    """The two calls the launcher makes to the Kubernetes API."""

    def create(self, namespace: str, body: dict[str, Any]) -> None: ...

    def get(self, namespace: str, name: str) -> dict[str, Any]: ...


class TrainJobApiError(TrainingError):
    """A Kubernetes API call that failed: ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, status: int | None, message: str) -> None:
        # No answer or a 5xx may well go away: the step's retry runs it again, and a job
        # created before is then found by its name (``trainjob.create``).
        super().__init__(message, transient=status is None or status >= 500)
        self.status = status


class KubernetesTrainJobs:
    """TrainJobs through the Kubernetes API: the in-cluster credentials of the step's pod,
    or else the kubeconfig ($KUBECONFIG or ~/.kube/config) of a launcher run outside one.

    Raises:
        TrainJobApiError: from every call, for an error answer or no answer.
    """

    def __init__(self) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            kube_config.load_kube_config()
        self._api = client.CustomObjectsApi()

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        self._call(self._api.create_namespaced_custom_object, namespace, body)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call(self._api.get_namespaced_custom_object, namespace, name)
        return found

    def _call(self, method: Callable[..., Any], namespace: str, arg: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return method(GROUP, VERSION, namespace, PLURAL, arg)
        except ApiException as exc:
            try:
                message = json.loads(exc.body or "{}").get("message", "")
            except (ValueError, AttributeError):  # not a Status object
                message = ""
            raise TrainJobApiError(
                exc.status, f"{exc.status} {exc.reason}: {message}".rstrip(": ")
            ) from None
        except HTTPError as exc:
            cause = getattr(exc, "reason", None) or exc
            host = self._api.api_client.configuration.host
            raise TrainJobApiError(
                None, f"the Kubernetes API server at {host} cannot be reached ({cause})"
            ) from None
