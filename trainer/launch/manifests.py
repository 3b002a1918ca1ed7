"""Typed builders for every object the launcher creates; the single source of the manifests in k8s/.

Only plain dicts come out, ready for the kubernetes client or `kubectl apply`. One node is a batch/v1 Job;
several are a JobSet (kubernetes-sigs/jobset), which restarts its worker group as one unit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from trainer.cluster import JOB_ENV, WORKERS_ENV
from trainer.config import EXIT_INTERRUPTED, EXIT_LEASED, EXIT_PEER_LOST, EXIT_USAGE, flag

APP = "mnist-trainer"
TENSORBOARD = f"{APP}-tensorboard"  # its Deployment, Service and ServiceAccount (read-only on the bucket)
RUN_LABEL = "mnist-trainer/run"
CONTAINER = "trainer"
WORKER_PORT = 2222
TENSORBOARD_PORT = 6006
SCRATCH = "/scratch"
IMAGE_UID = 1000  # the image's own non-root user (docker/Dockerfile creates it with this uid and group)
TMP = "/tmp"  # the image's HOME too: the one place the processes write besides scratch (an emptyDir here)
GPU = "nvidia.com/gpu"
# GKE Spot VMs: the node label, also the taint of the pools the GKE steps make (tolerated by Spot pods only).
SPOT_LABEL = "cloud.google.com/gke-spot"
# On a Spot preemption GKE gives ordinary pods 15 s of the VM's 30 s notice (system pods get the rest).
SPOT_GRACE_SECONDS = 15
GRACE_MARGIN = 5  # seconds of the pod's grace period left to the process after the trainer's own --grace-seconds
JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
# The oldest Kubernetes with every field used here on by default: the Job's successPolicy (a multi-worker run
# succeeds when worker 0 does) is beta from 1.31 (GA in 1.33); an older API server drops it without a word.
MIN_KUBERNETES = (1, 31)
# The JobSet release to install: the one the local control plane tests against (tests/cluster/jobset/go.mod).
# v0.10.0 is the oldest with every field used here (onJobFailureMessagePatterns).
JOBSET_RELEASE = "v0.10.1"
REPLICATED_JOB = "worker"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# Trainer flags the builders set themselves; `submit` refuses them among the user's trainer flags.
LAUNCHER_FLAGS = tuple(flag(name) for name in ("output_dir", "run", "scratch_dir", "grace_seconds", "expect_gpus"))
MAX_NAME = 63  # Kubernetes label values, Job names and pod hostnames (DNS-1035 labels)
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_POD_SUFFIX = "-abcde"  # the random suffix Kubernetes appends to a Job's pod names


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """Everything that varies between training jobs; trainer flags pass through untouched."""

    run: str
    image: str
    output_dir: str
    trainer_args: tuple[str, ...] = ()
    gpus: int = 1  # per worker
    workers: int = 1
    gpu_type: str = ""  # GKE accelerator, e.g. nvidia-l4; "" = any GPU node
    namespace: str = "default"
    service_account: str = APP
    queue: str = ""  # Kueue LocalQueue; "" = not queued
    priority: str = ""  # Kueue WorkloadPriorityClass
    max_runtime: int = 0  # seconds (activeDeadlineSeconds); 0 = no limit
    cpu: str = "4"
    memory: str = "16Gi"
    shm: str = "2Gi"
    spot: bool = False  # on GKE Spot VMs only: their node label, their taint tolerated, their shorter grace
    grace_seconds: int = 30  # the pod's terminationGracePeriodSeconds (Kubernetes' default)
    retries: int = 4  # counted retries: the Job's backoffLimit, the JobSet's maxRestarts
    ttl_seconds: int = 7 * 24 * 3600


def longest_name(run: str, workers: int) -> str:
    """The longest name Kubernetes derives from a run: its JobSet's last pod, or its Job's pod."""
    if workers > 1:  # JobSet: Job <run>-worker-0, pods <job>-<index>-<suffix>, hostnames <job>-<index>
        return f"{run}-{REPLICATED_JOB}-0-{workers - 1}{_POD_SUFFIX}"
    return run


def run_name_problem(run: str, workers: int) -> str | None:
    """Why `run` cannot name a job of `workers` workers, or None if it can."""
    if not _DNS_1035.match(run):
        return "must start with a lowercase letter and hold only lowercase letters, digits and '-'"
    room = MAX_NAME - (len(longest_name(run, workers)) - len(run))
    if len(run) > room:
        return f"is {len(run)} characters; at most {room} fit the names Kubernetes derives from it"
    return None


def worker_hosts(spec: JobSpec) -> list[str]:
    """host:port of every worker: the pod hostnames under the JobSet's headless Service (its subdomain)."""
    job = f"{spec.run}-{REPLICATED_JOB}-0"
    return [f"{job}-{i}.{spec.run}:{WORKER_PORT}" for i in range(spec.workers)]


def _labels(run: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component, RUN_LABEL: run}


def _queue_labels(spec: JobSpec) -> dict[str, str]:
    labels = {KUEUE_QUEUE_LABEL: spec.queue} if spec.queue else {}
    return labels | ({KUEUE_PRIORITY_LABEL: spec.priority} if spec.priority else {})


def _metadata(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels}


def _restricted_pod() -> dict[str, Any]:
    """The pod securityContext of the "restricted" Pod Security Standard, as the image's user."""
    return {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _restricted_container() -> dict[str, Any]:
    """A container securityContext of the "restricted" standard, with a read-only root filesystem."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}


def pod_grace(spec: JobSpec) -> int:
    """The pod's terminationGracePeriodSeconds: what GKE grants a Spot pod, else the spec's."""
    return min(spec.grace_seconds, SPOT_GRACE_SECONDS) if spec.spot else spec.grace_seconds


def trainer_grace(spec: JobSpec) -> int:
    """The trainer's --grace-seconds: save and ship within the pod's grace period, less a margin for exiting."""
    return max(1, pod_grace(spec) - GRACE_MARGIN)


def _trainer_container(spec: JobSpec) -> dict[str, Any]:
    # The pod's GPUs are expected: a node or image whose CUDA stack fails makes the trainer exit, not train on the CPU.
    own = dict(zip(LAUNCHER_FLAGS, (spec.output_dir, spec.run, SCRATCH, str(trainer_grace(spec)), str(spec.gpus))))
    args = ["train", *(part for flag, value in own.items() for part in (flag, value)), *spec.trainer_args]
    resources: dict[str, Any] = {"requests": {"cpu": spec.cpu, "memory": spec.memory},
                                 "limits": {"memory": spec.memory}}
    if spec.gpus:
        resources["limits"][GPU] = str(spec.gpus)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "args": args,
        "resources": resources,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": SCRATCH},
                         {"name": "tmp", "mountPath": TMP}],
        "securityContext": _restricted_container(),
        # The job across its restarts (the Job or JobSet keeps its name): a restarted pod may take over the
        # run's lease from the attempt before it, where a trainer of any other job is refused.
        "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": JOB_ENV, "value": f"$(POD_NAMESPACE)/{spec.run}"}],
    }
    if spec.workers > 1:
        # The trainer builds TF_CONFIG from these and the Indexed Job's JOB_COMPLETION_INDEX.
        container["env"].append({"name": WORKERS_ENV, "value": ",".join(worker_hosts(spec))})
        container["ports"] = [{"name": "collective", "containerPort": WORKER_PORT}]
    return container


def _pod_spec(spec: JobSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are the Job's (or the JobSet's), under the failure policies
        "serviceAccountName": spec.service_account,
        "terminationGracePeriodSeconds": pod_grace(spec),
        "securityContext": _restricted_pod(),
        "containers": [_trainer_container(spec)],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    tolerations, selector = [], {}
    if spec.gpus:
        tolerations.append({"key": GPU, "operator": "Exists", "effect": "NoSchedule"})
        if spec.gpu_type:
            selector["cloud.google.com/gke-accelerator"] = spec.gpu_type
    if spec.spot:
        tolerations.append({"key": SPOT_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"})
        selector[SPOT_LABEL] = "true"
    if tolerations:
        pod["tolerations"] = tolerations
    if selector:
        pod["nodeSelector"] = selector
    return pod


def _exit_codes(action: str, *codes: int) -> dict[str, Any]:
    # The API server refuses a Job whose exit codes are not in ascending order (found by the local control plane).
    return {"action": action, "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": sorted(codes)}}


_DISRUPTED = {"onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}  # preemption, eviction, drain


def training_job(spec: JobSpec) -> dict[str, Any]:
    """The single-node Job: one pod, MirroredStrategy over its GPUs."""
    labels = _labels(spec.run, "trainer")
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.retries,
        "ttlSecondsAfterFinished": spec.ttl_seconds,
        "podFailurePolicy": {"rules": [
            _exit_codes("FailJob", EXIT_USAGE, EXIT_LEASED),  # bad usage or config, a run another job trains
            _exit_codes("Ignore", EXIT_INTERRUPTED),  # SIGTERM after saving, lease lost: retry without counting
            {"action": "Ignore", **_DISRUPTED},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": _pod_spec(spec)},
    }
    if spec.max_runtime:
        job_spec["activeDeadlineSeconds"] = spec.max_runtime
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": _metadata(spec.run, spec.namespace, labels | _queue_labels(spec)), "spec": job_spec}


# The Job controller's failure messages for the FailJob rules of the worker Job below, which the JobSet's
# failure policy tells apart (JobSet KEP 262): "Container trainer for pod NS/POD failed with exit code 2
# matching FailJob rule at index 0", "Pod NS/POD has condition DisruptionTarget matching FailJob rule at index 2".
_BAD_USAGE = f"exit code ({EXIT_USAGE}|{EXIT_LEASED}) matching FailJob rule"
_RETRYABLE = (f"exit code ({EXIT_INTERRUPTED}|{EXIT_PEER_LOST}) matching FailJob rule",
              "condition DisruptionTarget matching FailJob rule")


def training_jobset(spec: JobSpec) -> dict[str, Any]:
    """The multi-worker JobSet: one Indexed Job of `workers` pods (MultiWorkerMirroredStrategy), restarted
    as a whole when any worker fails, through JobSet's own headless Service and pod hostnames."""
    labels = _labels(spec.run, "trainer")
    # Any failed pod fails the worker Job at once (backoffLimit 0); the JobSet then decides for the group.
    worker_job: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.workers,
        "parallelism": spec.workers,
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": [
            _exit_codes("FailJob", EXIT_USAGE, EXIT_LEASED),
            _exit_codes("FailJob", EXIT_INTERRUPTED, EXIT_PEER_LOST),
            {"action": "FailJob", **_DISRUPTED},
        ]},
        "successPolicy": {"rules": [{"succeededIndexes": "0"}]},  # worker 0 finished: the run is done
        "template": {"metadata": {"labels": labels}, "spec": _pod_spec(spec)},
    }
    if spec.max_runtime:
        worker_job["activeDeadlineSeconds"] = spec.max_runtime  # per attempt of the group
    failure_policy = {
        "maxRestarts": spec.retries,
        # Every old pod is gone (worker 0 has shipped its last checkpoint) before the new group starts.
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {"name": "BadUsage", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [_BAD_USAGE]},
            {"name": "PreemptedOrPeerLost", "action": "RestartJobSetAndIgnoreMaxRestarts",
             "onJobFailureReasons": ["PodFailurePolicy"], "onJobFailureMessagePatterns": list(_RETRYABLE)},
            {"name": "OutOfTime", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
            {"name": "Crash", "action": "RestartJobSet", "onJobFailureReasons": ["BackoffLimitExceeded"]},
        ],
    }
    return {
        "apiVersion": f"{JOBSET_GROUP}/{JOBSET_VERSION}",
        "kind": "JobSet",
        "metadata": _metadata(spec.run, spec.namespace, labels | _queue_labels(spec)),
        "spec": {
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "failurePolicy": failure_policy,
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1,
                                "template": {"metadata": {"labels": labels}, "spec": worker_job}}],
            "ttlSecondsAfterFinished": spec.ttl_seconds,
        },
    }


def training_objects(spec: JobSpec) -> list[dict[str, Any]]:
    """Everything `submit` creates for the run, in creation order."""
    return [training_jobset(spec) if spec.workers > 1 else training_job(spec)]


def service_account(namespace: str, gcp_service_account: str = "", name: str = APP) -> dict[str, Any]:
    """The Kubernetes ServiceAccount pods run as; bound to Google Cloud by Workload Identity (no keys)."""
    metadata = _metadata(name, namespace, {"app.kubernetes.io/name": APP})
    if gcp_service_account:
        metadata["annotations"] = {"iam.gke.io/gcp-service-account": gcp_service_account}
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}


LAUNCHER_ROLE = f"{APP}-launcher"


def launcher_role(namespace: str = "default") -> dict[str, Any]:
    """A Role with just what the launcher's commands need in one namespace, for the people who run them."""
    def rule(group: str, resources: list[str], verbs: list[str]) -> dict[str, Any]:
        return {"apiGroups": [group], "resources": resources, "verbs": verbs}

    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _metadata(LAUNCHER_ROLE, namespace, {"app.kubernetes.io/name": APP}),
            "rules": [
                rule("batch", ["jobs"], ["create", "get", "list", "delete"]),  # submit, status, list, cancel
                rule(JOBSET_GROUP, [JOBSET_PLURAL], ["create", "get", "list", "delete"]),
                rule("kueue.x-k8s.io", ["localqueues"], ["get"]),  # submit --queue checks it exists
                rule("", ["pods"], ["get", "list"]),  # status, logs (and port-forward finds TensorBoard's)
                rule("", ["pods/log"], ["get"]),
                rule("", ["events"], ["list"]),
                # submit and tensorboard create them; patch only to set --gcp-service-account
                rule("", ["serviceaccounts"], ["create", "patch"]),
                rule("apps", ["deployments"], ["create", "patch"]),  # tensorboard, created then updated
                rule("", ["services"], ["create", "get", "patch"]),
                rule("", ["pods/portforward"], ["create"]),  # kubectl port-forward svc/mnist-trainer-tensorboard
            ]}


def launcher_role_binding(namespace: str = "default", group: str = "GROUP") -> dict[str, Any]:
    """Binds the launcher's Role to a group of users (as the cluster's authentication names it)."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _metadata(LAUNCHER_ROLE, namespace, {"app.kubernetes.io/name": APP}),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LAUNCHER_ROLE},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]}


def tensorboard_objects(image: str, logdir: str, namespace: str = "default") -> list[dict[str, Any]]:
    """A shared TensorBoard over every run under `logdir` (e.g. gs://BUCKET/runs): Deployment + Service."""
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "tensorboard"}
    container = {
        "name": "tensorboard",
        "image": image,
        "command": ["tensorboard"],
        # --load_fast false: TensorBoard's Python reader, through TensorFlow's GCS file system, whose requests
        # the tests check against roles/storage.objectViewer; its Rust data server reads GCS experimentally.
        "args": ["--logdir", logdir, "--bind_all", "--port", str(TENSORBOARD_PORT), "--reload_interval", "30",
                 "--load_fast", "false"],
        "ports": [{"name": "http", "containerPort": TENSORBOARD_PORT}],
        "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        # Ready once it serves; restarted if it stops answering (a first scan of a large bucket takes a while).
        "readinessProbe": {"httpGet": {"path": "/", "port": TENSORBOARD_PORT}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/", "port": TENSORBOARD_PORT}, "initialDelaySeconds": 60,
                          "periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 4},
        "volumeMounts": [{"name": "tmp", "mountPath": TMP}],
        "securityContext": _restricted_container(),
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(TENSORBOARD, namespace, labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"serviceAccountName": TENSORBOARD, "securityContext": _restricted_pod(),
                                  "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}]}},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(TENSORBOARD, namespace, labels),
        # Inside the cluster only: reach it with `kubectl port-forward` (or put an authenticating proxy in front).
        "spec": {"type": "ClusterIP", "selector": labels,
                 "ports": [{"name": "http", "port": 80, "targetPort": TENSORBOARD_PORT}]},
    }
    return [deployment, service]
