"""A thin client over the official `kubernetes` package: create, read, stream and delete our objects,
turning API refusals into one-line LaunchErrors."""

from __future__ import annotations

import json
from typing import Any, Iterator

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from trainer.launch.manifests import APP, RUN_LABEL

EXIT_REFUSED = 2  # bad usage, or the API refused (403, 404, 409, quota)
EXIT_NO_CLUSTER = 3  # no kube config, or the API server cannot be reached


class LaunchError(Exception):
    """A one-line failure for the user, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_REFUSED, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status  # the API's HTTP status, 0 if there was no answer


def _explain(error: ApiException, what: str) -> LaunchError:
    try:
        message = json.loads(error.body or "{}").get("message", "") or error.reason
    except ValueError:
        message = error.reason
    if error.status == 403 and "quota" in message.lower():
        return LaunchError(f"refused by a resource quota: {message}", status=403)
    if error.status == 403:
        return LaunchError(f"forbidden: your account may not {what} ({message})", status=403)
    if error.status == 404:
        return LaunchError(f"not found: {what} ({message})", status=404)
    if error.status == 409:
        return LaunchError(f"already exists: {what} ({message}); pick another --run or cancel the old one",
                           status=409)
    return LaunchError(f"the Kubernetes API refused to {what}: {error.status} {message}", status=error.status)


class Cluster:
    """The cluster of the current kube context (or the one this pod runs in)."""

    def __init__(self, context: str | None = None) -> None:
        try:
            config.load_kube_config(context=context)
        except (ConfigException, FileNotFoundError, TypeError) as kube_error:
            try:
                config.load_incluster_config()
            except ConfigException:
                raise LaunchError(f"no Kubernetes cluster configured: {kube_error}", EXIT_NO_CLUSTER) from None
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiException as error:
            if error.status == 0:
                raise LaunchError(f"cannot reach the Kubernetes API: {error.reason}", EXIT_NO_CLUSTER) from None
            raise _explain(error, what) from None
        except HTTPError as error:
            raise LaunchError(f"cannot reach the Kubernetes API: {error}", EXIT_NO_CLUSTER) from None

    def create(self, obj: dict[str, Any], exist_ok: bool = False) -> None:
        """Create one object (Job, Service, Deployment or ServiceAccount); optionally tolerate 409."""
        kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]
        create = {
            "Job": self.batch.create_namespaced_job,
            "Service": self.core.create_namespaced_service,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Deployment": self.apps.create_namespaced_deployment,
        }[kind]
        try:
            self._call(f"create {kind} {ns}/{name}", create, ns, obj)
        except LaunchError as error:
            if not (exist_ok and error.status == 409):
                raise

    def replace(self, obj: dict[str, Any]) -> None:
        """Create an object, or replace it if it exists (used for the long-lived TensorBoard)."""
        kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]
        try:
            self.create(obj)
        except LaunchError as error:
            if error.status != 409:
                raise
            patch = {"Service": self.core.patch_namespaced_service,
                     "Deployment": self.apps.patch_namespaced_deployment}[kind]
            self._call(f"update {kind} {ns}/{name}", patch, name, ns, obj)

    def job(self, namespace: str, run: str) -> Any:
        """The Job of a run."""
        return self._call(f"read job {namespace}/{run}", self.batch.read_namespaced_job, run, namespace)

    def jobs(self, namespace: str) -> list[Any]:
        """All of our Jobs in the namespace, newest first."""
        listed = self._call(f"list jobs in {namespace}", self.batch.list_namespaced_job, namespace,
                            label_selector=f"app.kubernetes.io/name={APP}")
        return sorted(listed.items, key=lambda j: j.metadata.creation_timestamp or "", reverse=True)

    def pods(self, namespace: str, run: str) -> list[Any]:
        """The pods of a run's Job, oldest first."""
        listed = self._call(f"list pods of {namespace}/{run}", self.core.list_namespaced_pod, namespace,
                            label_selector=f"{RUN_LABEL}={run}")
        return sorted(listed.items, key=lambda p: (p.metadata.creation_timestamp or "", p.metadata.name))

    def logs(self, namespace: str, pod: str, follow: bool) -> Iterator[str]:
        """A pod's log lines, following new ones if asked."""
        response = self._call(f"read logs of {namespace}/{pod}", self.core.read_namespaced_pod_log, pod, namespace,
                              follow=follow, _preload_content=False)
        for line in response.stream(decode_content=True) if follow else [response.data]:
            yield line.decode(errors="replace") if isinstance(line, bytes) else line

    def cancel(self, namespace: str, run: str) -> None:
        """Delete a run's Job and its pods (foreground propagation), and its workers' Service if any."""
        body = client.V1DeleteOptions(propagation_policy="Foreground")
        self._call(f"delete job {namespace}/{run}", self.batch.delete_namespaced_job, run, namespace, body=body)
        try:
            self._call(f"delete service {namespace}/{run}", self.core.delete_namespaced_service, run, namespace)
        except LaunchError as error:
            if error.status != 404:
                raise
