"""The launcher against a real control plane (tests/cluster/): the real API server admits our objects in a
namespace that enforces the "restricted" Pod Security Standard, and the real Job, JobSet and Kueue controllers
decide what each exit code of a pod does. KWOK simulates the nodes, so no pod runs the trainer: a test ends a
pod with the exit code it names (KWOK's chaos stage), evicts it (a disruption), or lets it succeed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

import pytest

from conftest import ROOT, error_lines

CLUSTER_DIR = os.path.join(ROOT, "build", "cluster-test")  # its own: a `make cluster` of the user's stays up
FAILED_LABEL = "pod-container-running-failed.stage.kwok.x-k8s.io"
SUCCEEDED_LABEL = "pod-container-running-succeeded.stage.mnist-trainer.test"
INDEX = "batch.kubernetes.io/job-completion-index"


class Local:
    """The control plane of this test file: the launcher pointed at it, and a hand on its pods."""

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client, config

        self.kubeconfig = kubeconfig
        settings = client.Configuration()
        config.load_kube_config(kubeconfig, client_configuration=settings)
        self.api = client.ApiClient(settings)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.submitted: list[str] = []

    def launch(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "KUBECONFIG": self.kubeconfig}
        return subprocess.run([sys.executable, "-m", "trainer.launch", *args], cwd=ROOT, capture_output=True,
                              text=True, env=env, timeout=120)

    def submit(self, run: str, *options: str, trainer: tuple[str, ...] = ("--model", "cnn")) -> None:
        result = self.launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", run, *options,
                             "--", *trainer)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == run
        self.submitted.append(run)

    def pods(self, run: str, phase: str | None = None) -> list[Any]:
        found = self.core.list_namespaced_pod("default", label_selector=f"mnist-trainer/run={run}").items
        return [p for p in found if phase is None or (p.status.phase == phase and not p.metadata.deletion_timestamp)]

    def running(self, run: str, count: int = 1, worker: int | None = None) -> Any:
        """Wait until `count` pods of the run run; the one of `worker` (or the first)."""
        assert until(lambda: len(self.pods(run, "Running")) == count), self.launch("status", run).stdout
        pods = self.pods(run, "Running")
        if worker is None:
            return pods[0]
        return next(p for p in pods if p.metadata.annotations.get(INDEX) == str(worker))

    def end(self, pod: Any, code: int) -> None:
        """The pod's container ends with `code` (0: the pod succeeds)."""
        if code == 0:
            patch = {"metadata": {"labels": {SUCCEEDED_LABEL: "true"}}}
        else:
            patch = {"metadata": {"labels": {FAILED_LABEL: "true"},
                                  "annotations": {f"{FAILED_LABEL}/exit-code": str(code),
                                                  f"{FAILED_LABEL}/delay": "0", f"{FAILED_LABEL}/jitter-delay": "0"}}}
        self.core.patch_namespaced_pod(pod.metadata.name, "default", patch)

    def evict(self, pod: Any) -> None:
        """A disruption, as a node drain or preemption makes it: the Eviction API (condition DisruptionTarget)."""
        name = pod.metadata.name
        self.core.create_namespaced_pod_eviction(name, "default", {
            "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": "default"}})

    def status(self, run: str) -> str:
        result = self.launch("status", run)
        assert result.returncode == 0, result.stderr
        return result.stdout


def until(condition: Callable[[], object], timeout: float = 60, interval: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


@pytest.fixture(autouse=True)
def _cancel_runs(request):
    """Every run a test submitted is deleted after it, giving its quota back to the queue."""
    yield
    if "local" in request.fixturenames:
        local = request.getfixturevalue("local")
        for run in local.submitted:
            local.launch("cancel", run)
        local.submitted.clear()
        assert until(lambda: not local.core.list_namespaced_pod("default", label_selector="mnist-trainer/run").items)


@pytest.fixture(scope="module")
def local() -> Local:
    """One control plane for this file: built (if a pin changed) and started here, stopped at the end."""
    from tests.cluster.control_plane import KUEUE_METRICS_CERTS, can_write_kueue_certs

    reason = ("needs Go (go on PATH) to build the local control plane from tests/cluster/" if shutil.which("go") is None
              else f"needs root: Kueue reads its metrics certificate from {KUEUE_METRICS_CERTS}"
              if not can_write_kueue_certs() else "")
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "CLUSTER_DIR": CLUSTER_DIR}
    built = subprocess.run(["make", "--no-print-directory", "cluster-bin"], cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    up = subprocess.run([sys.executable, "-m", "tests.cluster.control_plane", "up"], cwd=ROOT, capture_output=True,
                        text=True, env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        yield Local(os.path.join(CLUSTER_DIR, "kubeconfig"))
    finally:
        subprocess.run([sys.executable, "-m", "tests.cluster.control_plane", "down"], cwd=ROOT, env=env, timeout=120)


# --- a single node: the Job's podFailurePolicy, applied by the real Job controller ---


def test_a_single_node_run_is_admitted_in_the_restricted_namespace_and_succeeds(local):
    local.submit("one-ok", "--gpus", "4", "--gpu-type", "nvidia-l4")
    pod = local.running("one-ok")
    assert pod.spec.node_name.startswith("gpu-node-")  # a GPU node: the toleration and the selector hold
    local.end(pod, 0)
    waited = local.launch("wait", "one-ok", "--timeout", "60", "--interval", "1")
    assert waited.returncode == 0 and waited.stdout.startswith("one-ok: Succeeded"), waited.stdout + waited.stderr


@pytest.mark.parametrize("code", [2, 73])
def test_bad_usage_and_a_leased_run_fail_a_single_node_run_at_once(local, code):
    run = f"one-fail-{code}"
    local.submit(run, "--gpus", "1")
    local.end(local.running(run), code)
    waited = local.launch("wait", run, "--timeout", "60", "--interval", "1")
    assert waited.returncode == 4, waited.stdout + waited.stderr
    assert f"failed with exit code {code} matching FailJob rule" in waited.stdout
    assert len(local.pods(run)) == 1  # never retried


@pytest.mark.parametrize("cause", ["exit 75", "disruption"])
def test_an_interrupted_single_node_run_is_retried_without_counting(local, cause):
    run = f"one-{cause.replace(' ', '-')}"
    local.submit(run, "--gpus", "1", "--retries", "1")
    for _ in range(3):  # more often than --retries allows: none of it counts
        pod = local.running(run)
        local.evict(pod) if cause == "disruption" else local.end(pod, 75)
        assert until(lambda: any(p.metadata.name != pod.metadata.name for p in local.pods(run, "Running")))
    assert "Running (Job; failed pods 0, 0 counted of 1 allowed)" in local.status(run)


@pytest.mark.parametrize("code", [1, 137, 71, 74, 69])  # 69, a lost peer, has no rule of its own on one node
def test_a_crash_is_retried_and_counted_until_the_retries_are_spent(local, code):
    run = f"one-crash-{code}"
    local.submit(run, "--gpus", "1", "--retries", "1")
    first = local.running(run)
    local.end(first, code)
    assert until(lambda: any(p.metadata.name != first.metadata.name for p in local.pods(run, "Running")))
    status = local.status(run)
    assert "failed pods 1, 1 counted of 1 allowed" in status
    assert f"pod {first.metadata.name}: Failed, last exit {code} (containerFailed)" in status
    previous = local.launch("logs", run, "--previous")  # the failed attempt's pod, kept by the Job
    assert previous.returncode == 0 and "simulated by KWOK" in previous.stdout, previous.stderr
    local.end(local.pods(run, "Running")[0], code)
    waited = local.launch("wait", run, "--timeout", "60", "--interval", "1")
    assert waited.returncode == 4 and "BackoffLimitExceeded" in waited.stdout, waited.stdout


# --- several workers: the JobSet's failure policy over the worker Job's messages, by the real controllers ---


def test_a_group_succeeds_when_worker_0_succeeds(local):
    local.submit("group-ok", "--gpus", "1", "--workers", "2")
    again = local.launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", "group-ok",
                         "--gpus", "1", "--workers", "2", "--", "--model", "cnn")
    assert again.returncode == 2 and error_lines(again.stderr) == [
        again.stderr.strip()] and "already exists: create JobSet default/group-ok" in again.stderr
    local.end(local.running("group-ok", 2, worker=0), 0)
    waited = local.launch("wait", "group-ok", "--timeout", "60", "--interval", "1")
    assert waited.returncode == 0 and "Succeeded" in waited.stdout, waited.stdout + waited.stderr


# What the real controllers do with a worker that ends this way, as the tests below show; the group runner of the
# process trials (tests/group.py, through tests/jobset_policy.py) must decide alike.
GROUP_OUTCOMES = {2: "FailJobSet", 73: "FailJobSet", 75: "RestartJobSetAndIgnoreMaxRestarts",
                  69: "RestartJobSetAndIgnoreMaxRestarts", "disruption": "RestartJobSetAndIgnoreMaxRestarts",
                  1: "RestartJobSet", 137: "RestartJobSet", 71: "RestartJobSet", 74: "RestartJobSet"}


def test_the_process_trials_group_runner_decides_as_the_real_controllers_do():
    from jobset_policy import job_failure, jobset_action
    from trainer.launch.manifests import JobSpec, training_objects

    jobset = training_objects(JobSpec(run="r", image="i", output_dir="gs://b/r", workers=2))[0]
    for cause, action in GROUP_OUTCOMES.items():
        failure = {"disrupted": True} if cause == "disruption" else {"exit_code": cause}
        assert jobset_action(jobset, *job_failure(jobset, **failure)) == action, cause


@pytest.mark.parametrize("code", [c for c, a in GROUP_OUTCOMES.items() if a == "FailJobSet"])
def test_bad_usage_in_any_worker_fails_the_group_at_once(local, code):
    run = f"group-fail-{code}"
    local.submit(run, "--gpus", "1", "--workers", "2")
    local.end(local.running(run, 2, worker=1), code)
    waited = local.launch("wait", run, "--timeout", "60", "--interval", "1")
    assert waited.returncode == 4, waited.stdout + waited.stderr
    assert "restarts 0" in local.status(run).replace("group restarts", "restarts")


@pytest.mark.parametrize("cause", [c if c == "disruption" else f"exit {c}" for c, a in GROUP_OUTCOMES.items()
                                   if a == "RestartJobSetAndIgnoreMaxRestarts"])
def test_an_interrupted_or_lost_worker_restarts_the_group_without_counting(local, cause):
    run = f"group-{cause.replace(' ', '-')}"
    local.submit(run, "--gpus", "1", "--workers", "2", "--retries", "1")
    for restart in range(1, 3):
        pod = local.running(run, 2, worker=1)
        local.evict(pod) if cause == "disruption" else local.end(pod, int(cause.split()[1]))
        assert until(lambda: f"group restarts {restart}, 0 counted" in local.status(run)), local.status(run)
    assert local.running(run, 2)  # a new group of two runs


@pytest.mark.parametrize("code", [c for c, a in GROUP_OUTCOMES.items() if a == "RestartJobSet"])
def test_a_crashed_worker_restarts_the_group_counting_until_the_retries_are_spent(local, code):
    run = f"group-crash-{code}"
    local.submit(run, "--gpus", "1", "--workers", "2", "--retries", "1")
    local.end(local.running(run, 2, worker=0), code)
    assert until(lambda: "group restarts 1, 1 counted of 1 allowed" in local.status(run)), local.status(run)
    local.end(local.running(run, 2, worker=1), code)
    waited = local.launch("wait", run, "--timeout", "60", "--interval", "1")
    assert waited.returncode == 4, waited.stdout + waited.stderr


# --- the API server's own rules, and what the launcher reads back ---


def test_the_namespace_enforces_the_restricted_standard(local):
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as refused:  # a pod as most images would run: as root, escalation allowed
        local.core.create_namespaced_pod("default", {"metadata": {"name": "unrestricted"}, "spec": {
            "containers": [{"name": "c", "image": "img:1"}]}})
    message = json.loads(refused.value.body)["message"]
    assert refused.value.status == 403 and 'violates PodSecurity "restricted:latest"' in message
    for detail in ("allowPrivilegeEscalation != false", "unrestricted capabilities", "runAsNonRoot != true",
                   "seccompProfile"):
        assert detail in message


def test_cancel_deletes_the_run_and_everything_it_owned(local):
    local.submit("cancelled", "--gpus", "1", "--workers", "2")
    local.running("cancelled", 2)
    result = local.launch("cancel", "cancelled")
    assert result.returncode == 0, result.stderr
    selector = "jobset.sigs.k8s.io/jobset-name=cancelled"
    assert until(lambda: not local.pods("cancelled") and
                 not local.batch.list_namespaced_job("default", label_selector=selector).items and
                 not local.core.list_namespaced_service("default", label_selector=selector).items)
    assert local.launch("status", "cancelled").returncode == 2


def test_tensorboard_becomes_available_and_is_updated_in_place(local):
    result = local.launch("tensorboard", "--image", "img:1", "--logdir", "gs://b/old")
    assert result.returncode == 0, result.stderr
    result = local.launch("tensorboard", "--image", "img:1", "--logdir", "gs://b/runs")
    assert result.returncode == 0 and "port-forward svc/mnist-trainer-tensorboard" in result.stdout, result.stderr
    deployment = local.apps.read_namespaced_deployment("mnist-trainer-tensorboard", "default")
    assert deployment.spec.template.spec.containers[0].args[:2] == ["--logdir", "gs://b/runs"]

    def available() -> bool:
        status = local.apps.read_namespaced_deployment("mnist-trainer-tensorboard", "default").status
        return (status.available_replicas or 0) == 1

    assert until(available)


def test_a_run_that_does_not_fit_the_queue_waits_suspended_until_the_first_ends(local):
    local.submit("queued-a", "--gpus", "4", "--workers", "2", "--queue", "default")  # all 8 GPUs of the quota
    local.running("queued-a", 2)
    local.submit("queued-b", "--gpus", "4", "--queue", "default")
    time.sleep(3)
    assert "queued-b: Suspended" in local.status("queued-b") and not local.pods("queued-b")
    local.end(local.running("queued-a", 2, worker=0), 0)
    assert until(lambda: local.pods("queued-b", "Running")), local.status("queued-b")


def test_wait_gives_up_with_exit_5_while_the_run_goes_on(local):
    local.submit("waited", "--gpus", "1")
    local.running("waited")
    waited = local.launch("wait", "waited", "--timeout", "2", "--interval", "1")
    assert waited.returncode == 5 and "waited is still Running after 2 s" in waited.stderr, waited.stderr
    assert local.pods("waited", "Running")


def test_a_run_longer_than_max_runtime_ends_deadline_exceeded(local):
    local.submit("deadline", "--gpus", "1", "--max-runtime", "3")
    local.running("deadline")
    waited = local.launch("wait", "deadline", "--timeout", "60", "--interval", "1")
    assert waited.returncode == 4 and "DeadlineExceeded" in waited.stdout, waited.stdout


def test_list_and_events_read_the_real_objects(local):
    local.submit("listed", "--gpus", "1")
    local.submit("listed-group", "--gpus", "1", "--workers", "2")
    local.end(local.running("listed"), 0)
    assert until(lambda: "listed\tJob\tSucceeded" in local.launch("list").stdout)
    listed = [line.split("\t")[:2] for line in local.launch("list").stdout.splitlines()]
    assert ["listed-group", "JobSet"] in listed and not [n for n, kind in listed if n.startswith("listed-group-")]
    assert local.batch.read_namespaced_job("listed-group-worker-0", "default")  # its Job exists, listed as it
    events = local.launch("events", "listed")
    assert events.returncode == 0 and "SuccessfulCreate" in events.stdout and "Scheduled" in events.stdout


@pytest.mark.parametrize("command", [["status", "nope"], ["wait", "nope"], ["cancel", "nope"], ["events", "nope"],
                                     ["logs", "nope"]])
def test_a_run_that_does_not_exist_is_one_line(local, command):
    result = local.launch(*command)
    assert result.returncode == 2 and error_lines(result.stderr) == [result.stderr.strip()]
    assert "not found" in result.stderr


def test_a_resource_quota_refusal_is_one_line(local):
    local.core.create_namespace({"metadata": {"name": "quota", "labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    local.core.create_namespaced_resource_quota("quota", {"metadata": {"name": "no-jobs"},
                                                          "spec": {"hard": {"count/jobs.batch": "0"}}})
    result = local.launch("-n", "quota", "submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", "q",
                          "--gpus", "1", "--", "--model", "cnn")
    assert result.returncode == 2 and error_lines(result.stderr) == [result.stderr.strip()]
    assert result.stderr.startswith("error: refused by a resource quota: ") and "count/jobs.batch" in result.stderr


@pytest.mark.parametrize("command, account", [("submit", "mnist-trainer"), ("tensorboard", "mnist-trainer-tensorboard")])
def test_a_service_account_is_annotated_only_when_a_google_one_is_given(local, command, account):
    from kubernetes.client.rest import ApiException

    def run(name: str, *options: str) -> subprocess.CompletedProcess:
        if command == "submit":
            local.submitted.append(name)
            return local.launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", name, "--gpus",
                                "1", *options, "--", "--model", "cnn")
        return local.launch("tensorboard", "--image", "img:1", "--logdir", "gs://b/runs", *options)

    admin_set = {"metadata": {"name": account, "annotations": {"set-by": "the cluster's admin"}}}
    try:
        local.core.create_namespaced_service_account("default", admin_set)
    except ApiException as error:  # made by an earlier test's submit or tensorboard
        assert error.status == 409
        local.core.patch_namespaced_service_account(account, "default", admin_set)
    assert run("sa1").returncode == 0
    annotations = local.core.read_namespaced_service_account(account, "default").metadata.annotations
    assert annotations == {"set-by": "the cluster's admin"}  # left alone
    email = "trainer@p.iam.gserviceaccount.com"
    result = run("sa2", "--gcp-service-account", email)
    assert result.returncode == 0, result.stderr
    annotations = local.core.read_namespaced_service_account(account, "default").metadata.annotations
    assert annotations == {"set-by": "the cluster's admin", "iam.gke.io/gcp-service-account": email}


def test_submit_to_a_queue_that_does_not_exist_is_refused_in_one_line(local):
    result = local.launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", "noqueue",
                          "--queue", "team-x", "--", "--model", "cnn")
    assert result.returncode == 2 and error_lines(result.stderr) == [result.stderr.strip()]
    assert "not found: find LocalQueue default/team-x" in result.stderr
    assert not local.pods("noqueue")


def test_the_launcher_role_is_enough_to_run_and_nothing_more(local, tmp_path):
    """A user bound only to k8s/launcher-role.yaml's Role (real RBAC; the user authenticates with a token of
    its own) can submit, watch, read logs, open TensorBoard and cancel, and is refused Secrets and other
    namespaces."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from trainer.launch.manifests import launcher_role, launcher_role_binding

    local.core.create_namespaced_service_account("default", {"metadata": {"name": "alice"}})
    local.core.create_namespace({"metadata": {"name": "other"}})
    rbac = client.RbacAuthorizationV1Api(local.api)
    rbac.create_namespaced_role("default", launcher_role("default"))
    binding = launcher_role_binding("default", group="unused")
    binding["subjects"] = [{"kind": "ServiceAccount", "name": "alice", "namespace": "default"}]
    rbac.create_namespaced_role_binding("default", binding)
    token = local.core.create_namespaced_service_account_token("alice", "default", {
        "spec": {"expirationSeconds": 3600}}).status.token
    admin = yaml_load(local.kubeconfig)
    admin["users"] = [{"name": "alice", "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = "alice"
    path = tmp_path / "alice.kubeconfig"
    path.write_text(json.dumps(admin))
    alice = Local(str(path))

    alice.submit("alice-run", "--gpus", "1", "--queue", "default")
    local.submitted.append("alice-run")
    pod = local.running("alice-run")
    assert "Running" in alice.status("alice-run")
    logs = alice.launch("logs", "alice-run")
    assert logs.returncode == 0 and "simulated by KWOK" in logs.stdout, logs.stderr
    assert alice.launch("events", "alice-run").returncode == 0 and alice.launch("list").returncode == 0
    board = alice.launch("tensorboard", "--image", "img:1", "--logdir", "gs://b/runs")
    assert board.returncode == 0, board.stderr
    local.end(pod, 0)
    waited = alice.launch("wait", "alice-run", "--timeout", "60", "--interval", "1")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    cancelled = alice.launch("cancel", "alice-run")
    assert cancelled.returncode == 0, cancelled.stderr
    with pytest.raises(ApiException) as refused:
        alice.core.list_namespaced_secret("default")
    assert refused.value.status == 403
    elsewhere = alice.launch("-n", "other", "submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run",
                             "alice-other", "--gpus", "1", "--", "--model", "cnn")
    assert elsewhere.returncode == 2 and "forbidden" in elsewhere.stderr, elsewhere.stderr


def yaml_load(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def test_last_without_jobset_a_group_is_refused_in_one_line_and_a_single_node_still_runs(local):
    """Last in this file: it removes JobSet's CRD from the control plane."""
    from kubernetes import client

    from trainer.launch.client import INSTALL_JOBSET

    client.ApiextensionsV1Api(local.api).delete_custom_resource_definition("jobsets.jobset.x-k8s.io")

    def gone() -> bool:
        try:
            local.custom.get_api_resources("jobset.x-k8s.io", "v1alpha2")
            return False
        except client.rest.ApiException as error:
            return error.status == 404

    assert until(gone)
    result = local.launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", "nojobset",
                          "--gpus", "1", "--workers", "2", "--", "--model", "cnn")
    assert result.returncode == 2 and error_lines(result.stderr) == [result.stderr.strip()]
    assert "does not serve the JobSet API" in result.stderr and INSTALL_JOBSET in result.stderr
    local.submit("single-without-jobset", "--gpus", "1")
    assert local.running("single-without-jobset")
