"""A thin client over the official `kubernetes` package: create, read, stream and delete a run's objects
(a Job, or a JobSet for several workers), every call bounded by a request timeout, API refusals turned
into one-line LaunchErrors."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Callable, Iterator

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError, ReadTimeoutError

from trainer.config import EXIT_NO_CLUSTER, EXIT_USAGE, TrainerError
from trainer.launch.manifests import (APP, JOBSET_GROUP, JOBSET_PLURAL, JOBSET_RELEASE, JOBSET_VERSION,
                                      MIN_KUBERNETES, RUN_LABEL)

REQUEST_TIMEOUT = 30.0  # seconds per API call, unless --request-timeout says otherwise
CONNECT_TIMEOUT = 10.0
FOLLOW_IDLE = 300.0  # seconds a followed log may stay silent before the stream is re-opened
# Kueue serves v1beta2 since 0.15 (stored as it since 0.16); v1beta1 is deprecated, to be removed.
KUEUE_GROUP, KUEUE_VERSIONS = "kueue.x-k8s.io", ("v1beta2", "v1beta1")
JOB_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
INSTALL_JOBSET = (f"kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases/download/"
                  f"{JOBSET_RELEASE}/manifests.yaml")


class LaunchError(TrainerError):
    """A one-line failure for the user: the API refused (403, 404, 409, quota, a missing JobSet or Kueue API;
    exit 2), or there is no cluster to ask (exit 3)."""

    def __init__(self, message: str, code: int = EXIT_USAGE, status: int = 0) -> None:
        super().__init__(message, code)
        self.status = status  # the API's HTTP status, 0 if there was no answer


@dataclasses.dataclass(frozen=True)
class RunState:
    """What a run's Job or JobSet says about it, in one shape for both kinds."""

    kind: str  # "Job" or "JobSet"
    state: str  # Pending, Running, Suspended, Succeeded or Failed
    restarts: int  # Job: failed pods; JobSet: group restarts
    counted: int  # restarts that count against the limit
    limit: int  # backoffLimit or maxRestarts
    reason: str
    message: str
    created: str

    @property
    def finished(self) -> bool:
        return self.state in ("Succeeded", "Failed")


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


def _condition_state(conditions: list[dict[str, Any]], succeeded: tuple[str, ...], failed: tuple[str, ...],
                     running: bool) -> tuple[str, str, str]:
    """(state, reason, message) from a workload's true conditions."""
    true = {c["type"]: c for c in conditions if c.get("status") == "True"}
    for kinds, state in ((failed, "Failed"), (succeeded, "Succeeded"), (("Suspended",), "Suspended")):
        for kind in kinds:
            if kind in true:
                return state, true[kind].get("reason") or "", true[kind].get("message") or ""
    return ("Running" if running else "Pending"), "", ""


class Cluster:
    """The cluster of the current kube context (or the one this pod runs in)."""

    def __init__(self, context: str | None = None, timeout: float = REQUEST_TIMEOUT) -> None:
        try:
            config.load_kube_config(context=context)
        except (ConfigException, FileNotFoundError, TypeError) as kube_error:
            try:
                config.load_incluster_config()
            except ConfigException:
                raise LaunchError(f"no Kubernetes cluster configured: {kube_error}", EXIT_NO_CLUSTER) from None
        self.timeout = (min(CONNECT_TIMEOUT, timeout), timeout)
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self._served: dict[tuple[str, str], bool] = {}

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout)
        try:
            return fn(*args, **kwargs)
        except ApiException as error:
            if error.status == 0:
                raise LaunchError(f"cannot reach the Kubernetes API: {error.reason}", EXIT_NO_CLUSTER) from None
            raise _explain(error, what) from None
        except HTTPError as error:
            raise LaunchError(f"cannot reach the Kubernetes API ({what}): {error}", EXIT_NO_CLUSTER) from None

    def _dict(self, obj: Any) -> dict[str, Any]:
        return obj if isinstance(obj, dict) else self.api.sanitize_for_serialization(obj)

    # --- APIs that are add-ons ---

    def serves(self, group: str, version: str) -> bool:
        """True if the cluster serves the API group/version (e.g. JobSet's CRD is installed); asked once
        per command, not at every poll of `wait`."""
        if (group, version) not in self._served:
            try:
                self._call(f"discover {group}/{version}", self.custom.get_api_resources, group, version)
                self._served[group, version] = True
            except LaunchError as error:
                if error.status != 404:
                    raise
                self._served[group, version] = False
        return self._served[group, version]

    def require_version(self) -> None:
        """Refuse in one line when the API server is older than MIN_KUBERNETES."""
        info = self._call("read the server's version", client.VersionApi(self.api).get_code)
        found = tuple(int(re.match(r"\d+", part).group()) for part in (info.major, info.minor))  # GKE: "31+"
        if found < MIN_KUBERNETES:
            need = ".".join(map(str, MIN_KUBERNETES))
            raise LaunchError(f"this cluster runs Kubernetes {info.git_version}; runs need {need} or newer (a Job's "
                              "successPolicy, which ends a multi-worker run when worker 0 succeeds)")

    def require_jobset(self) -> None:
        """Refuse in one line, with the install command, when the JobSet API is missing."""
        if not self.serves(JOBSET_GROUP, JOBSET_VERSION):
            raise LaunchError(f"this cluster does not serve the JobSet API ({JOBSET_GROUP}/{JOBSET_VERSION}), "
                              f"needed for --workers > 1; install it with: {INSTALL_JOBSET}")

    def require_queue(self, namespace: str, queue: str) -> None:
        """Refuse in one line when Kueue or the LocalQueue `queue` is missing."""
        version = next((v for v in KUEUE_VERSIONS if self.serves(KUEUE_GROUP, v)), None)
        if version is None:
            raise LaunchError(f"--queue {queue}: this cluster does not serve Kueue's API ({KUEUE_GROUP} "
                              f"{' or '.join(KUEUE_VERSIONS)}); install Kueue or submit without --queue")
        self._call(f"find LocalQueue {namespace}/{queue} (kubectl -n {namespace} get localqueues)",
                   self.custom.get_namespaced_custom_object, KUEUE_GROUP, version, namespace, "localqueues", queue)

    # --- writing ---

    def create(self, obj: dict[str, Any], exist_ok: bool = False) -> None:
        """Create one object (JobSet, Job, Service, Deployment or ServiceAccount); optionally tolerate 409."""
        kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]
        if kind == "JobSet":
            create: Callable[..., Any] = lambda n, o, **kw: self.custom.create_namespaced_custom_object(  # noqa: E731
                JOBSET_GROUP, JOBSET_VERSION, n, JOBSET_PLURAL, o, **kw)
        else:
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
        """Create an object, or update it if it exists (the long-lived TensorBoard, an annotated ServiceAccount)."""
        kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]
        try:
            self.create(obj)
        except LaunchError as error:
            if error.status != 409:
                raise
            patch = {"Service": self.core.patch_namespaced_service,
                     "ServiceAccount": self.core.patch_namespaced_service_account,
                     "Deployment": self.apps.patch_namespaced_deployment}[kind]
            self._call(f"update {kind} {ns}/{name}", patch, name, ns, obj)

    def cancel(self, namespace: str, run: str) -> str:
        """Delete a run's JobSet or Job; its Jobs, pods and Service go with it (foreground). Returns the kind."""
        kind, _ = self.workload(namespace, run)
        body = client.V1DeleteOptions(propagation_policy="Foreground")
        if kind == "JobSet":
            self._call(f"delete JobSet {namespace}/{run}", self.custom.delete_namespaced_custom_object,
                       JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, run, body=body)
        else:
            self._call(f"delete Job {namespace}/{run}", self.batch.delete_namespaced_job, run, namespace, body=body)
        return kind

    # --- reading ---

    def workload(self, namespace: str, run: str) -> tuple[str, dict[str, Any]]:
        """("JobSet" or "Job", the object) of a run."""
        if self.serves(JOBSET_GROUP, JOBSET_VERSION):
            try:
                return "JobSet", self._call(f"read JobSet {namespace}/{run}", self.custom.get_namespaced_custom_object,
                                            JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, run)
            except LaunchError as error:
                if error.status != 404:
                    raise
        try:
            job = self._call(f"read job {namespace}/{run}", self.batch.read_namespaced_job, run, namespace)
        except LaunchError as error:
            if error.status == 404:
                raise LaunchError(f"not found: no run {run} (JobSet or Job) in namespace {namespace}",
                                  status=404) from None
            raise
        return "Job", self._dict(job)

    def state(self, namespace: str, run: str) -> RunState:
        """The run's state, restarts and last failure, from its JobSet or Job."""
        kind, obj = self.workload(namespace, run)
        return run_state(kind, obj)

    def runs(self, namespace: str) -> list[tuple[str, RunState]]:
        """(name, state) of every run in the namespace, newest first."""
        selector = f"app.kubernetes.io/name={APP}"
        found: list[tuple[str, RunState]] = []
        if self.serves(JOBSET_GROUP, JOBSET_VERSION):
            listed = self._call(f"list JobSets in {namespace}", self.custom.list_namespaced_custom_object,
                                JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, label_selector=selector)
            found += [(o["metadata"]["name"], run_state("JobSet", o)) for o in listed.get("items", [])]
        jobs = self._call(f"list jobs in {namespace}", self.batch.list_namespaced_job, namespace,
                          label_selector=selector)
        for job in (self._dict(j) for j in jobs.items):
            if JOBSET_LABEL not in (job["metadata"].get("labels") or {}):  # a JobSet's own Jobs are listed as it
                found.append((job["metadata"]["name"], run_state("Job", job)))
        return sorted(found, key=lambda item: item[1].created, reverse=True)

    def pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        """The pods of a run (every attempt still kept), oldest first."""
        listed = self._call(f"list pods of {namespace}/{run}", self.core.list_namespaced_pod, namespace,
                            label_selector=f"{RUN_LABEL}={run}")
        pods = [self._dict(p) for p in listed.items]
        return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))

    def events(self, namespace: str, run: str) -> list[dict[str, Any]]:
        """Events about the run's objects (JobSet, Jobs, pods, Service), oldest first."""
        listed = self._call(f"list events in {namespace}", self.core.list_namespaced_event, namespace)
        mine = [e for e in (self._dict(e) for e in listed.items)
                if (e.get("involvedObject") or {}).get("name", "") == run
                or (e.get("involvedObject") or {}).get("name", "").startswith(f"{run}-")]
        return sorted(mine, key=event_time)

    def logs(self, namespace: str, pod: str, follow: bool, previous: bool = False) -> Iterator[str]:
        """A pod's log; following new lines (re-opened after FOLLOW_IDLE quiet seconds) if asked."""
        what = f"read logs of {namespace}/{pod}"
        if not follow:
            response = self._call(what, self.core.read_namespaced_pod_log, pod, namespace, previous=previous,
                                  _preload_content=False)
            yield response.data.decode(errors="replace")
            return
        since: int | None = None
        while True:
            response = self._call(what, self.core.read_namespaced_pod_log, pod, namespace, follow=True,
                                  since_seconds=since, _preload_content=False,
                                  _request_timeout=(self.timeout[0], FOLLOW_IDLE))
            last = time.monotonic()
            try:
                for chunk in response.stream(decode_content=True):
                    last = time.monotonic()
                    yield chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk
                return  # the container ended
            except ReadTimeoutError:
                since = int(time.monotonic() - last) + 1


def event_time(event: dict[str, Any]) -> str:
    """When an event last happened (ISO text, sortable)."""
    return str(event.get("lastTimestamp") or event.get("eventTime") or
               (event.get("metadata") or {}).get("creationTimestamp") or "")


def run_state(kind: str, obj: dict[str, Any]) -> RunState:
    """A RunState from a Job's or JobSet's JSON."""
    status, spec = obj.get("status") or {}, obj.get("spec") or {}
    conditions = status.get("conditions") or []
    created = (obj.get("metadata") or {}).get("creationTimestamp") or ""
    if kind == "JobSet":
        active = any((r.get("active") or 0) or (r.get("ready") or 0) for r in status.get("replicatedJobsStatus") or [])
        state, reason, message = _condition_state(conditions, ("Completed",), ("Failed",), active)
        return RunState(kind, state, int(status.get("restarts") or 0), int(status.get("restartsCountTowardsMax") or 0),
                        int((spec.get("failurePolicy") or {}).get("maxRestarts") or 0), reason, message, str(created))
    state, reason, message = _condition_state(conditions, ("Complete", "SuccessCriteriaMet"),
                                              ("Failed", "FailureTarget"), bool(status.get("active")))
    failed = int(status.get("failed") or 0)
    return RunState(kind, state, failed, failed, int(spec.get("backoffLimit") or 0), reason, message, str(created))


def pod_summary(pod: dict[str, Any]) -> str:
    """`pod NAME (worker I): PHASE, exit CODE (REASON), restarts N` for `status`."""
    meta, status = pod["metadata"], pod.get("status") or {}
    index = (meta.get("annotations") or {}).get(JOB_INDEX_ANNOTATION)
    parts = [f"pod {meta['name']}" + (f" (worker {index})" if index is not None else "") + f": "
             f"{status.get('phase') or 'Unknown'}"]
    for container in status.get("containerStatuses") or []:
        terminated = ((container.get("state") or {}).get("terminated")
                      or (container.get("lastState") or {}).get("terminated"))
        if terminated:
            reason = f" ({terminated['reason']})" if terminated.get("reason") else ""
            parts.append(f"last exit {terminated.get('exitCode')}{reason}")
        if container.get("restartCount"):
            parts.append(f"container restarts {container['restartCount']}")
    return ", ".join(parts)
