"""Typed builders for every object the launcher creates; the single source of the manifests in k8s/.

Only plain dicts come out, ready for the kubernetes client or `kubectl apply`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainer.config import EXIT_INTERRUPTED, EXIT_USAGE

APP = "mnist-trainer"
RUN_LABEL = "mnist-trainer/run"
CONTAINER = "trainer"
WORKER_PORT = 2222
TENSORBOARD_PORT = 6006
SCRATCH = "/scratch"
GPU = "nvidia.com/gpu"


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
    cpu: str = "4"
    memory: str = "16Gi"
    shm: str = "2Gi"
    grace_seconds: int = 30
    backoff_limit: int = 4
    ttl_seconds: int = 7 * 24 * 3600


def _labels(run: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component, RUN_LABEL: run}


def _metadata(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels}


def _trainer_container(spec: JobSpec) -> dict[str, Any]:
    args = ["train", "--output-dir", spec.output_dir, "--run", spec.run, "--scratch-dir", SCRATCH,
            "--grace-seconds", str(max(1, spec.grace_seconds - 5)), *spec.trainer_args]
    resources: dict[str, Any] = {"requests": {"cpu": spec.cpu, "memory": spec.memory},
                                 "limits": {"memory": spec.memory}}
    if spec.gpus:
        resources["limits"][GPU] = str(spec.gpus)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "args": args,
        "resources": resources,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": SCRATCH}],
    }
    if spec.workers > 1:
        service = spec.run
        hosts = ",".join(f"{spec.run}-{i}.{service}:{WORKER_PORT}" for i in range(spec.workers))
        container["env"] = [{"name": "TRAINER_WORKERS", "value": hosts}]
        container["ports"] = [{"name": "collective", "containerPort": WORKER_PORT}]
    return container


def _pod_spec(spec: JobSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are the Job's, under its podFailurePolicy
        "serviceAccountName": spec.service_account,
        "terminationGracePeriodSeconds": spec.grace_seconds,
        "containers": [_trainer_container(spec)],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm}},
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    if spec.gpus:
        pod["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
        if spec.gpu_type:
            pod["nodeSelector"] = {"cloud.google.com/gke-accelerator": spec.gpu_type}
    if spec.workers > 1:
        pod["subdomain"] = spec.run  # <run>-<index>.<run> resolves through the headless Service
    return pod


def training_job(spec: JobSpec) -> dict[str, Any]:
    """The Job: one pod (MirroredStrategy over its GPUs), or an Indexed Job of `workers` pods."""
    labels = _labels(spec.run, "trainer")
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "ttlSecondsAfterFinished": spec.ttl_seconds,
        "podFailurePolicy": {"rules": [
            # Bad usage or config: retrying cannot help.
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                   "values": [EXIT_USAGE]}},
            # Stopped by SIGTERM after saving: retry, without spending the backoff limit.
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [EXIT_INTERRUPTED]}},
            # Preemption, eviction, node drain.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": _pod_spec(spec)},
    }
    if spec.workers > 1:
        job_spec.update(completionMode="Indexed", completions=spec.workers, parallelism=spec.workers)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec.run, spec.namespace, labels),
            "spec": job_spec}


def workers_service(spec: JobSpec) -> dict[str, Any]:
    """Headless Service giving each worker pod a stable DNS name for the collectives."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec.run, spec.namespace, _labels(spec.run, "workers")),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # workers find each other before any is Ready
            "selector": {RUN_LABEL: spec.run, "app.kubernetes.io/component": "trainer"},
            "ports": [{"name": "collective", "port": WORKER_PORT, "targetPort": WORKER_PORT}],
        },
    }


def training_objects(spec: JobSpec) -> list[dict[str, Any]]:
    """Everything `submit` creates, in creation order."""
    return ([workers_service(spec)] if spec.workers > 1 else []) + [training_job(spec)]


def service_account(namespace: str, gcp_service_account: str = "", name: str = APP) -> dict[str, Any]:
    """The Kubernetes ServiceAccount pods run as; bound to Google Cloud by Workload Identity (no keys)."""
    metadata = _metadata(name, namespace, {"app.kubernetes.io/name": APP})
    if gcp_service_account:
        metadata["annotations"] = {"iam.gke.io/gcp-service-account": gcp_service_account}
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}


def tensorboard_objects(image: str, logdir: str, namespace: str = "default", name: str = f"{APP}-tensorboard",
                        service_account_name: str = APP) -> list[dict[str, Any]]:
    """A shared TensorBoard over every run under `logdir` (e.g. gs://BUCKET/runs): Deployment + Service."""
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "tensorboard"}
    container = {
        "name": "tensorboard",
        "image": image,
        "command": ["tensorboard"],
        "args": ["--logdir", logdir, "--bind_all", "--port", str(TENSORBOARD_PORT), "--reload_interval", "30"],
        "ports": [{"name": "http", "containerPort": TENSORBOARD_PORT}],
        "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "readinessProbe": {"httpGet": {"path": "/", "port": TENSORBOARD_PORT}},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"serviceAccountName": service_account_name, "containers": [container]}},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, labels),
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": TENSORBOARD_PORT}]},
    }
    return [deployment, service]
