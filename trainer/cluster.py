"""Which task of which job this process is, from the environment Kubernetes and the launcher give a pod; no
TensorFlow. Multi-worker: TF_CONFIG, built at start from TRAINER_WORKERS (every worker's host:port) and the
Indexed Job's JOB_COMPLETION_INDEX, or validated if given. TRAINER_JOB names the Job or JobSet across its
restarts (`<namespace>/<name>`): a restarted attempt of the same job may take over the run's lease."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

from trainer.config import ConfigError

WORKERS_ENV = "TRAINER_WORKERS"
INDEX_ENV = "JOB_COMPLETION_INDEX"
JOB_ENV = "TRAINER_JOB"
_ADDRESS = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?:[0-9]{1,5}$")


def tf_config(workers: list[str], index: int) -> dict[str, Any]:
    """The TF_CONFIG of worker `index` in a cluster of `workers` (host:port each), validated."""
    if len(workers) < 2:
        raise ConfigError(f"a multi-worker cluster needs at least 2 workers, got {len(workers)}")
    for address in workers:
        if not _ADDRESS.match(address) or not 0 < int(address.rsplit(":", 1)[1]) < 65536:
            raise ConfigError(f"bad worker address {address!r} (want host:port)")
    if len(set(workers)) != len(workers):
        raise ConfigError(f"duplicate worker addresses in {workers}")
    if not 0 <= index < len(workers):
        raise ConfigError(f"worker index {index} is outside 0..{len(workers) - 1}")
    return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}


def configure_cluster(environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """Build and export TF_CONFIG from TRAINER_WORKERS and JOB_COMPLETION_INDEX, or validate a given
    TF_CONFIG; None on a single node."""
    if environ.get("TF_CONFIG"):
        try:
            given = json.loads(environ["TF_CONFIG"])
            config = tf_config(given["cluster"]["worker"], int(given["task"]["index"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"unusable TF_CONFIG: {error}") from error
        return config
    if not environ.get(WORKERS_ENV):
        return None
    try:
        index = int(environ.get(INDEX_ENV, ""))
    except ValueError as error:
        raise ConfigError(f"{WORKERS_ENV} is set but {INDEX_ENV} is not a number") from error
    config = tf_config(environ[WORKERS_ENV].split(","), index)
    os.environ["TF_CONFIG"] = json.dumps(config)
    return config


@dataclasses.dataclass(frozen=True)
class Task:
    """This process in its job: worker `index` of `workers`, and the job's name if it runs under one."""

    index: int = 0
    workers: int = 1
    job: str | None = None

    @property
    def chief(self) -> bool:
        """True on the worker that writes the run and holds its lease (worker 0; the only one on a single node)."""
        return self.index == 0


def this_task(environ: Mapping[str, str] = os.environ) -> Task:
    """This process's Task (TF_CONFIG is exported here for a multi-worker cluster)."""
    cluster = configure_cluster(environ)
    job = environ.get(JOB_ENV) or None
    if cluster is None:
        return Task(job=job)
    return Task(cluster["task"]["index"], len(cluster["cluster"]["worker"]), job)
