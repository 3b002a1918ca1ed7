"""A small stand-in for the JobSet controller: runs a worker group as real trainer processes on 127.0.0.1,
with the environment the manifests give each pod, and applies the JobSet's own failure policy (read from
the manifest the launcher would submit) when a worker fails: fail the run, or restart the whole group,
counting the restart or not."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from typing import Callable

from conftest import ROOT, process_state
from gcs import free_port
from jobset_policy import job_failure, jobset_action
from trainer.cluster import INDEX_ENV, WORKERS_ENV
from trainer.launch.manifests import JobSpec, training_objects

def pod_env(container: dict, namespace: str = "default") -> dict[str, str]:
    """A container's environment as the kubelet gives it: the namespace from the downward API, `$(VAR)`
    references to earlier variables expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, item
            env[item["name"]] = namespace
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
    return env


GRACE = 10.0  # seconds between SIGTERM and SIGKILL when the group is torn down (terminationGracePeriodSeconds)


@dataclasses.dataclass
class Exit:
    """How one worker of one attempt ended."""

    index: int
    code: int  # as Kubernetes reports it: 128 + signal for a killed process
    seconds: float  # after the attempt started
    stderr: str


@dataclasses.dataclass
class Attempt:
    """One run of the whole group."""

    number: int
    exits: list[Exit]
    action: str  # what the JobSet did next: Succeeded, FailJobSet, RestartJobSet, RestartJobSetAndIgnoreMaxRestarts


class Group:
    """W trainer processes of one run, restarted as a group the way the run's JobSet would restart them."""

    def __init__(self, workers: int, trainer_args: list[str], scratch: str, env: dict[str, str],
                 max_restarts: int = 4, worker_env: dict[int, dict[str, str]] | None = None) -> None:
        self.workers, self.trainer_args, self.scratch, self.env = workers, trainer_args, scratch, env
        self.worker_env = worker_env or {}  # what one worker's environment adds (e.g. its own proxy)
        # The policy of the JobSet `submit` creates for such a group (the image and bucket do not matter).
        self.jobset = training_objects(JobSpec(run="trial", image="-", output_dir="gs://-", workers=workers,
                                               retries=max_restarts))[0]
        self.max_restarts = max_restarts
        pod = self.jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        self.pod_env = pod_env(pod["containers"][0])  # the same in every attempt: the JobSet keeps its name
        self.attempts: list[Attempt] = []
        self.processes: list[subprocess.Popen] = []
        self.started = 0.0

    def start(self) -> None:
        """Start every worker of a new attempt (fresh addresses and scratch, like new pods)."""
        hosts = ",".join(f"127.0.0.1:{free_port()}" for _ in range(self.workers))
        attempt = len(self.attempts)
        os.makedirs(self.scratch, exist_ok=True)
        self.processes = []
        for index in range(self.workers):
            env = {**os.environ, **self.pod_env, **self.env, **self.worker_env.get(index, {}), WORKERS_ENV: hosts,
                   INDEX_ENV: str(index)}
            env.pop("TF_CONFIG", None)
            scratch = self._pod_path(attempt, index)
            with open(f"{scratch}.stderr", "w") as stderr:  # a file, not a pipe: nothing can block the worker
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "trainer", "train", *self.trainer_args, "--scratch-dir", scratch],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr))
        self.started = time.monotonic()

    def signal(self, index: int, signum: int) -> None:
        """Send a signal to one worker of the current attempt."""
        self.processes[index].send_signal(signum)

    def alive(self) -> list[int]:
        """Indexes of the current attempt's workers still running."""
        return [i for i, p in enumerate(self.processes) if p.poll() is None]

    def wait_attempt(self, timeout: float, on_first_failure: Callable[[Exit], None] | None = None) -> Attempt:
        """Wait for the current attempt to end the way the JobSet would end it, and record it."""
        exits: dict[int, Exit] = {}
        deadline = time.monotonic() + timeout
        first_failure: Exit | None = None
        while time.monotonic() < deadline:
            for index, process in enumerate(self.processes):
                if index not in exits and process.poll() is not None:
                    code = process.returncode if process.returncode >= 0 else 128 - process.returncode
                    exits[index] = Exit(index, code, time.monotonic() - self.started, self._stderr(index))
                    if code and first_failure is None:
                        first_failure = exits[index]
                        if on_first_failure:
                            on_first_failure(first_failure)
            if 0 in exits and exits[0].code == 0 and len(exits) == self.workers:
                break
            if first_failure is not None and (len(exits) == self.workers or self._stopped_rest(exits)):
                break
            time.sleep(0.1)
        self._tear_down(exits)
        if 0 in exits and exits[0].code == 0:
            action = "Succeeded"  # successPolicy: worker 0 finished
        elif first_failure is not None:
            action = jobset_action(self.jobset, *job_failure(self.jobset, exit_code=first_failure.code))
        else:
            action = "Timeout"
        attempt = Attempt(len(self.attempts), sorted(exits.values(), key=lambda e: e.index), action)
        self.attempts.append(attempt)
        return attempt

    def _stopped_rest(self, exits: dict[int, Exit]) -> bool:
        # Workers still "running" but frozen (SIGSTOP) never exit by themselves: the JobSet deletes them.
        return all(i in exits or self._frozen(p) for i, p in enumerate(self.processes))

    @staticmethod
    def _frozen(process: subprocess.Popen) -> bool:
        return process_state(process.pid) == "T"

    def _tear_down(self, exits: dict[int, Exit]) -> None:
        """Delete the attempt's remaining pods: SIGTERM, then SIGKILL after the grace period (BlockingRecreate:
        all are gone before the next attempt starts)."""
        for index, process in enumerate(self.processes):
            if self._frozen(process):
                process.kill()  # a frozen or lost node's pod is force-deleted; SIGTERM would stay pending
            elif process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + GRACE
        for index, process in enumerate(self.processes):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if index not in exits:
                code = process.returncode if process.returncode >= 0 else 128 - process.returncode
                exits[index] = Exit(index, code, time.monotonic() - self.started, self._stderr(index))

    def _pod_path(self, attempt: int, index: int) -> str:
        """The scratch folder of one worker of one attempt (its stderr file beside it)."""
        return os.path.join(self.scratch, f"attempt{attempt}-worker{index}")

    def _stderr(self, index: int) -> str:
        with open(f"{self._pod_path(len(self.attempts), index)}.stderr") as f:
            return f.read()

    def run(self, timeout: float, first: Callable[["Group"], None] | None = None) -> str:
        """Run attempts until the run succeeds or the policy fails it; `first` acts on the first attempt
        (e.g. injects a fault). Returns the final action."""
        counted = 0
        deadline = time.monotonic() + timeout
        while True:
            self.start()
            if first is not None and len(self.attempts) == 0:
                first(self)
            attempt = self.wait_attempt(max(1.0, deadline - time.monotonic()))
            if attempt.action in ("Succeeded", "FailJobSet", "Timeout"):
                return attempt.action
            if attempt.action == "RestartJobSet":
                counted += 1
                if counted > self.max_restarts:
                    return "FailJobSet"
