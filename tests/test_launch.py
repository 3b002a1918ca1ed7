"""The launcher: manifests against the official Kubernetes schemas (and JobSet's API), the group's failure
policy, run names, and real HTTP through the official client to an API stand-in."""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import re
import subprocess
import sys
import time

import pytest
import yaml
import kubernetes_validate

from conftest import ROOT, error_lines
from group import pod_env
from jobset_policy import job_failure, jobset_action
from kube import KubeAPI
from trainer.cluster import INDEX_ENV, JOB_ENV, WORKERS_ENV, configure_cluster
from trainer.config import DATASETS, PRESETS, build_config
from trainer.launch.cli import job_spec, parse, render_examples
from trainer.launch.manifests import (MIN_KUBERNETES, JobSpec, launcher_role, launcher_role_binding, longest_name,
                                      run_name_problem, service_account, tensorboard_objects, training_objects)

SCHEMAS = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
# Every Kubernetes release the launcher supports that kubernetes-validate has schemas for: MIN_KUBERNETES on.
SUPPORTED = sorted((d.split("-")[0][1:] for d in os.listdir(SCHEMAS) if d.endswith("-local-strict")
                    and tuple(int(x) for x in d[1:].split("-")[0].split(".")[:2]) >= MIN_KUBERNETES),
                   key=lambda v: tuple(int(x) for x in v.split(".")))
SINGLE = JobSpec(run="r1", image="img:1", output_dir="gs://b/runs", trainer_args=("--model", "cnn"), gpus=4,
                 gpu_type="nvidia-l4")
MULTI = JobSpec(run="r2", image="img:1", output_dir="gs://b/runs", gpus=1, workers=2)
CPU_ONLY = JobSpec(run="r3", image="img:1", output_dir="gs://b/runs", gpus=0)
QUEUED = JobSpec(run="r4", image="img:1", output_dir="gs://b/runs", queue="team-a", priority="high", max_runtime=3600)
QUEUED_GROUP = JobSpec(run="r5", image="img:1", output_dir="gs://b/runs", workers=3, queue="team-a",
                       max_runtime=3600)
SPOT_GROUP = JobSpec(run="r6", image="img:1", output_dir="gs://b/runs", workers=2, gpus=4, gpu_type="nvidia-l4",
                     spot=True)
JOBSETS = [*training_objects(MULTI), *training_objects(QUEUED_GROUP), *training_objects(SPOT_GROUP)]
CORE_OBJECTS = [*training_objects(SINGLE), *training_objects(CPU_ONLY), *training_objects(QUEUED),
                *training_objects(dataclasses.replace(SINGLE, run="r7", spot=True)),
                *tensorboard_objects("img:1", "gs://b/runs"),
                service_account("default", "sa@p.iam.gserviceaccount.com"), service_account("default"),
                launcher_role("team-a"), launcher_role_binding("team-a", "ml-engineers")]


def _name(obj: dict) -> str:
    return f"{obj['kind']}-{obj['metadata']['name']}"


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize("obj", CORE_OBJECTS, ids=_name)
def test_every_core_manifest_validates_against_the_official_schema(obj, version):
    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize("jobset", JOBSETS, ids=_name)
def test_the_jobsets_worker_job_validates_as_a_job(jobset, version):
    for replicated in jobset["spec"]["replicatedJobs"]:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{jobset['metadata']['name']}-x"},
               **replicated["template"]}
        kubernetes_validate.validate(job, version, strict=True)


def test_the_schemas_span_the_supported_releases():
    assert SUPPORTED[0] == "{}.{}.0".format(*MIN_KUBERNETES) and len(SUPPORTED) >= 5


# JobSet v1alpha2 has no schema here (no CRD offline); its fields and enums, from api/jobset/v1alpha2 of
# kubernetes-sigs/jobset v0.10-v0.12 and the webhook's validation.
JOBSET_FIELDS = {
    "spec": {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
             "coordinator", "managedBy", "ttlSecondsAfterFinished", "volumeClaimPolicies"},
    "network": {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"},
    "successPolicy": {"operator", "targetReplicatedJobs"},
    "failurePolicy": {"maxRestarts", "restartStrategy", "rules"},
    "rule": {"name", "action", "onJobFailureReasons", "onJobFailureMessagePatterns", "targetReplicatedJobs"},
    "replicatedJob": {"name", "groupName", "template", "replicas", "dependsOn"},
}
ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
           "RestartJobAndIgnoreMaxRestarts"}
REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded", "PodFailurePolicy"}
RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("jobset", JOBSETS, ids=_name)
def test_jobset_fields_are_those_of_jobset_v1alpha2(jobset):
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    spec = jobset["spec"]
    assert set(spec) <= JOBSET_FIELDS["spec"]
    assert set(spec["network"]) <= JOBSET_FIELDS["network"] and spec["network"]["enableDNSHostnames"] is True
    assert set(spec["successPolicy"]) <= JOBSET_FIELDS["successPolicy"]
    assert spec["successPolicy"]["operator"] in ("All", "Any")
    policy = spec["failurePolicy"]
    assert set(policy) <= JOBSET_FIELDS["failurePolicy"] and isinstance(policy["maxRestarts"], int)
    assert policy["restartStrategy"] in ("Recreate", "BlockingRecreate", "InPlaceRestart")
    names = [r["name"] for r in policy["rules"]]
    assert len(set(names)) == len(names)
    for rule in policy["rules"]:
        assert set(rule) <= JOBSET_FIELDS["rule"] and RULE_NAME.match(rule["name"]) and rule["action"] in ACTIONS
        assert set(rule.get("onJobFailureReasons", [])) <= REASONS
        for pattern in rule.get("onJobFailureMessagePatterns", []):
            re.compile(pattern)
    replicated_names = {r["name"] for r in spec["replicatedJobs"]}
    assert set(spec["successPolicy"]["targetReplicatedJobs"]) <= replicated_names
    for replicated in spec["replicatedJobs"]:
        assert set(replicated) <= JOBSET_FIELDS["replicatedJob"] and DNS_1035.match(replicated["name"])
        assert isinstance(replicated["replicas"], int) and 1 <= replicated["replicas"] <= 1024


@pytest.mark.parametrize("failure, action", [
    (dict(exit_code=2), "FailJobSet"),  # bad usage: never retried
    (dict(exit_code=75), "RestartJobSetAndIgnoreMaxRestarts"),  # SIGTERM after saving
    (dict(exit_code=69), "RestartJobSetAndIgnoreMaxRestarts"),  # a lost peer
    (dict(disrupted=True), "RestartJobSetAndIgnoreMaxRestarts"),  # preemption, eviction, node drain
    (dict(exit_code=1), "RestartJobSet"),  # a crash: counted
    (dict(exit_code=137), "RestartJobSet"),  # kill -9, OOM
    (dict(exit_code=74), "RestartJobSet"),  # the store stayed down: counted
    (dict(exit_code=12), "RestartJobSet"),
    (dict(exit_code=20), "RestartJobSet"),
])
def test_the_group_failure_policy(failure, action):
    jobset = training_objects(MULTI)[0]
    assert jobset_action(jobset, *job_failure(jobset, **failure)) == action
    assert jobset_action(jobset, "DeadlineExceeded", "Job was active longer than specified deadline") == "FailJobSet"


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_single_node_job():
    job = training_objects(SINGLE)[-1]
    pod = job["spec"]["template"]["spec"]
    container = _container(job)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    assert pod["terminationGracePeriodSeconds"] == 30 and pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 4 and job["spec"]["ttlSecondsAfterFinished"] > 0
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert [(r["action"], r.get("onExitCodes", {}).get("values")) for r in rules] == [
        ("FailJob", [2, 73]), ("Ignore", [75]), ("Ignore", None)]
    assert rules[2]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert job["metadata"]["labels"]["mnist-trainer/run"] == "r1"
    assert container["args"][:8] == ["train", "--output-dir", "gs://b/runs", "--run", "r1", "--scratch-dir",
                                     "/scratch", "--grace-seconds"]
    assert container["args"][-4:] == ["--expect-gpus", "4", "--model", "cnn"]  # the trainer refuses to run without them
    assert "completionMode" not in job["spec"] and "activeDeadlineSeconds" not in job["spec"]
    assert pod_env(container, "team") == {"POD_NAMESPACE": "team", "TRAINER_JOB": "team/r1"}  # no TRAINER_WORKERS
    text = yaml.safe_dump(job)
    assert "secret" not in text.lower() and "key.json" not in text and "kueue" not in text


@pytest.mark.parametrize("spec", [dataclasses.replace(SINGLE, spot=True), SPOT_GROUP], ids=["job", "jobset"])
def test_spot_pods_go_to_spot_nodes_only_and_save_within_the_15_s_gke_gives_them(spec):
    pod = _pod_template(training_objects(spec)[0])
    assert pod["terminationGracePeriodSeconds"] == 15
    args = pod["containers"][0]["args"]
    assert args[args.index("--grace-seconds") + 1] == "10"  # 5 s of the 15 left to exit
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4", "cloud.google.com/gke-spot": "true"}
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
            "effect": "NoSchedule"} in pod["tolerations"]
    regular = _pod_template(training_objects(dataclasses.replace(spec, spot=False))[0])
    assert regular["terminationGracePeriodSeconds"] == 30 and "gke-spot" not in yaml.safe_dump(regular)


def _pod_template(obj: dict) -> dict:
    """The pod spec of a Job, or of a JobSet's worker Job."""
    job = obj["spec"]["replicatedJobs"][0]["template"] if obj["kind"] == "JobSet" else obj
    return job["spec"]["template"]["spec"]


def test_kueue_labels_and_max_runtime():
    job = training_objects(QUEUED)[0]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    jobset = training_objects(QUEUED_GROUP)[0]
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"  # Kueue admits the whole group
    assert jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["activeDeadlineSeconds"] == 3600


def test_multi_worker_jobset_and_tf_config_from_the_same_code(monkeypatch):
    [jobset] = training_objects(MULTI)  # no hand-made Service: JobSet makes its own headless one
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    assert jobset["spec"]["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["worker"]}
    [replicated] = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    assert replicated["replicas"] == 1 and job["completionMode"] == "Indexed" and job["completions"] == 2
    assert job["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}  # worker 0 done: the run is done
    assert "subdomain" not in job["template"]["spec"]  # JobSet sets it
    env = pod_env(_container(replicated["template"]), "team")
    assert env[JOB_ENV] == "team/r2"  # the same in every attempt of the group: it may take the lease over
    monkeypatch.setenv("TF_CONFIG", "")
    config = configure_cluster({**env, INDEX_ENV: "1"})  # what the container does at start
    # JobSet's pod hostnames <jobset>-<replicated job>-<job index>-<pod index> under its Service <jobset>.
    assert config["cluster"]["worker"] == ["r2-worker-0-0.r2:2222", "r2-worker-0-1.r2:2222"]
    assert config["task"] == {"type": "worker", "index": 1}
    assert WORKERS_ENV in env


@pytest.mark.parametrize("model, dataset", list(itertools.product(PRESETS, DATASETS)))
def test_generated_run_names_are_valid_kubernetes_names(model, dataset):
    for workers in (1, 2, 64):
        args = parse(["submit", "--image", "i", "--output-dir", "gs://b/r", "--workers", str(workers), "--gpus", "1",
                      "--", "--model", model, "--dataset", dataset, "--batch-size", "128"])
        spec = job_spec(args)
        assert run_name_problem(spec.run, workers) is None
        longest = longest_name(spec.run, workers)
        assert DNS_1035.match(longest) and len(longest) <= 63, longest
        assert build_config({"model": model, "dataset": dataset}).run.run.startswith(spec.run[:10])


@pytest.mark.parametrize("run, workers, message", [
    ("Bad_Name", 1, "must start with a lowercase letter"),
    ("1abc", 1, "must start with a lowercase letter"),
    ("a" * 64, 1, "at most 63"),
    ("a" * 47, 2, "at most 46"),
    ("a" * 46, 100, "at most 45"),
])
def test_bad_run_names(run, workers, message):
    assert message in run_name_problem(run, workers)


def test_k8s_folder_is_what_the_builders_produce(tmp_path):
    render_examples(str(tmp_path))
    for path in glob.glob(os.path.join(ROOT, "k8s", "*.yaml")):
        assert open(path).read() == (tmp_path / os.path.basename(path)).read_text(), f"run `make manifests`: {path}"
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in glob.glob(f"{ROOT}/k8s/*.yaml"))


def launch(*args: str, kubeconfig: str = "/nonexistent", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run([sys.executable, "-m", "trainer.launch", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_the_launcher_never_imports_tensorflow():
    code = ("import sys, trainer.launch.cli, trainer.launch.client; "
            "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_dry_run_prints_the_exact_yaml_and_needs_no_cluster():
    result = launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", "r2", "--gpus", "1",
                    "--workers", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert list(yaml.safe_load_all(result.stdout)) == [service_account("default"), *training_objects(MULTI)]


@pytest.mark.parametrize("model", ["convnet_bn", "lenet_bn"])
def test_the_readme_submit_works_for_every_preset_without_a_run_name(model):
    result = launch("submit", "--image", "I", "--output-dir", "gs://b/runs", "--dry-run", "--", "--model", model,
                    "--dataset", "fashion_mnist")
    assert result.returncode == 0, result.stderr
    assert f"name: {model.replace('_', '-')}-fashion-mnist-" in result.stdout


def test_launcher_options_go_before_or_after_the_subcommand():
    common = ["--image", "i", "--output-dir", "gs://b/r", "--run", "t1", "--dry-run"]
    before = launch("--namespace", "ml", "submit", *common)
    after = launch("submit", *common, "--namespace", "ml")
    assert before.returncode == after.returncode == 0, after.stderr
    assert before.stdout == after.stdout and "namespace: ml" in after.stdout


@pytest.mark.parametrize("args, message", [
    (["--", "--model", "nope"], "unknown model 'nope'"),
    (["--", "--epochs", "0"], "--epochs must be positive"),
    (["--workers", "3", "--", "--batch-size", "64"], "not divisible by 3 replicas"),
    (["--run", "Bad_Name"], "must start with a lowercase letter"),
    (["--", "--run", "x"], "--run is set by the launcher"),
    (["--", "--expect-gpus=2"], "--expect-gpus is set by the launcher, from submit's own flags (--output-dir, --run, "
                                "--gpus)"),
    (["--model", "cnn"], "--model is a trainer flag: put trainer flags after `--`"),
    (["--epochs=3"], "--epochs is a trainer flag"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--max-runtime", "-1"], "must be >= 0"),
])
def test_bad_flags_are_refused_before_any_cluster_call(args, message):
    result = launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--dry-run", *args)
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("output_dir", ["./runs", "runs", "/tmp/runs", "gs://", "s3://b/r"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_submit_refuses_an_output_dir_that_is_not_a_bucket(output_dir, workers):
    result = launch("submit", "--image", "i", "--output-dir", output_dir, "--run", "t1", "--workers", workers,
                    "--dry-run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is not a bucket" in result.stderr and not result.stdout


@pytest.fixture
def api(tmp_path):
    server = KubeAPI()
    path = tmp_path / "kubeconfig"
    path.write_text(server.kubeconfig())
    server.path = str(path)
    yield server
    server.stop()


GROUP = ["submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", "r2", "--gpus", "1", "--workers", "2"]


def test_submit_creates_a_jobset_for_a_group_and_409_on_a_second_submit(api):
    result = launch(*GROUP, kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "r2"
    assert api.objects[("jobsets", "default", "r2")]["spec"] == training_objects(MULTI)[0]["spec"]
    assert ("serviceaccounts", "default", "mnist-trainer") in api.objects
    assert not [k for k in api.objects if k[0] in ("services", "jobs")]
    posts = [path for method, path, _ in api.requests if method == "POST"]
    assert posts == ["/api/v1/namespaces/default/serviceaccounts",
                     "/apis/jobset.x-k8s.io/v1alpha2/namespaces/default/jobsets"]
    again = launch(*GROUP, kubeconfig=api.path)
    assert again.returncode == 2
    assert error_lines(again.stderr)[0].startswith("error: already exists: create JobSet default/r2")


@pytest.mark.parametrize("version, refused", [("1.30.14", True), ("1.31.0", False), ("1.35.1", False)])
def test_submit_refuses_a_kubernetes_older_than_the_minimum_in_one_line(tmp_path, version, refused):
    server = KubeAPI(version=version)
    path = tmp_path / "kubeconfig"
    path.write_text(server.kubeconfig())
    try:
        result = launch(*GROUP, kubeconfig=str(path))
        posts = [m for m, _, _ in server.requests if m == "POST"]
    finally:
        server.stop()
    if refused:
        assert result.returncode == 2 and result.stderr == (
            f"error: this cluster runs Kubernetes v{version}; runs need 1.31 or newer (a Job's successPolicy, "
            "which ends a multi-worker run when worker 0 succeeds)\n")
        assert not posts  # nothing created
    else:
        assert result.returncode == 0 and len(posts) == 2, result.stderr


def test_submit_without_jobset_installed_says_how_to_install_it(tmp_path):
    server = KubeAPI(installed=())
    path = tmp_path / "kubeconfig"
    path.write_text(server.kubeconfig())
    try:
        result = launch(*GROUP, kubeconfig=str(path))
        assert result.returncode == 2 and len(error_lines(result.stderr)) == 1 == result.stderr.count("\n")
        assert "does not serve the JobSet API" in result.stderr
        install = "kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases/download/"
        assert install in result.stderr
        assert not [m for m, _, _ in server.requests if m == "POST"]
        single = launch("submit", "--image", "i", "--output-dir", "gs://b/r", "--run", "one", kubeconfig=str(path))
        assert single.returncode == 0, single.stderr  # a single node needs no JobSet
        assert ("jobs", "default", "one") in server.objects
        assert launch("list", kubeconfig=str(path)).stdout.startswith("one\tJob\t")
    finally:
        server.stop()


@pytest.mark.parametrize("kueue", [("v1beta2", "v1beta1"), ("v1beta2",), ("v1beta1",), ()])
def test_submit_with_a_queue_finds_it_under_kueues_current_api_then_the_deprecated_one(tmp_path, kueue):
    server = KubeAPI(installed=("jobset.x-k8s.io/v1alpha2", *(f"kueue.x-k8s.io/{v}" for v in kueue)))
    path = tmp_path / "kubeconfig"
    path.write_text(server.kubeconfig())
    queued = ["submit", "--image", "i", "--output-dir", "gs://b/r", "--run", "q1", "--queue", "team-a",
              "--priority", "high"]
    try:
        missing = launch(*queued, kubeconfig=str(path))
        assert missing.returncode == 2 and len(error_lines(missing.stderr)) == 1
        if not kueue:
            assert "does not serve Kueue's API (kueue.x-k8s.io v1beta2 or v1beta1)" in missing.stderr
            return
        assert "not found: find LocalQueue default/team-a" in missing.stderr
        server.put("localqueues", {"apiVersion": f"kueue.x-k8s.io/{kueue[0]}", "kind": "LocalQueue",
                                   "metadata": {"name": "team-a", "namespace": "default"}})
        result = launch(*queued, kubeconfig=str(path))
        assert result.returncode == 0, result.stderr
        asked = {p for m, p, _ in server.requests if p.endswith("/localqueues/team-a")}
        assert asked == {f"/apis/kueue.x-k8s.io/{kueue[0]}/namespaces/default/localqueues/team-a"}
        labels = server.objects[("jobs", "default", "q1")]["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["kueue.x-k8s.io/priority-class"] == "high"
    finally:
        server.stop()


def _pod(name: str, run: str, index: int, phase: str, exit_code: int | None = None, reason: str = "") -> dict:
    terminated = {"terminated": {"exitCode": exit_code, "reason": reason}} if exit_code is not None else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"mnist-trainer/run": run},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                         "creationTimestamp": f"2026-11-22T10:0{index}:00Z"},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "trainer", "image": "img:1", "imageID": "", "ready": phase == "Running", "restartCount": 0,
                "state": terminated or {"running": {}}}]}}


def _jobset_status(api: KubeAPI, run: str, status: dict) -> None:
    api.objects[("jobsets", "default", run)]["status"] = status


def test_status_of_a_group_shows_restarts_and_each_pods_last_exit_code(api):
    assert launch(*GROUP, kubeconfig=api.path).returncode == 0
    _jobset_status(api, "r2", {"restarts": 3, "restartsCountTowardsMax": 1,
                               "replicatedJobsStatus": [{"name": "worker", "active": 1, "ready": 1}]})
    api.put("pods", _pod("r2-worker-0-0-abcde", "r2", 0, "Running"))
    api.put("pods", _pod("r2-worker-0-1-fghij", "r2", 1, "Failed", 69, "Error"))
    result = launch("status", "r2", kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "r2: Running (JobSet; group restarts 3, 1 counted of 4 allowed)"
    assert lines[1] == "  pod r2-worker-0-0-abcde (worker 0): Running"
    assert lines[2] == "  pod r2-worker-0-1-fghij (worker 1): Failed, last exit 69 (Error)"


def test_status_of_a_failed_job(api):
    api.put("jobs", {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "r1", "namespace": "default"},
        "spec": {"backoffLimit": 4, "template": {"spec": {"containers": []}}},
        "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                                "message": "Container trainer exited with 2"}]}})
    api.put("pods", _pod("r1-abc", "r1", 0, "Failed", 2))
    api.logs[("default", "r1-abc")] = "error: unknown model 'x'\n"
    result = launch("status", "r1", kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["r1: Failed (Job; failed pods 1, 1 counted of 4 allowed)",
                                              "  PodFailurePolicy: Container trainer exited with 2"]
    assert "pod r1-abc (worker 0): Failed, last exit 2" in result.stdout
    logs = launch("logs", "r1", kubeconfig=api.path)
    assert logs.returncode == 0 and logs.stdout == "error: unknown model 'x'\n"


def test_wait_exits_0_on_success_4_on_failure_5_on_timeout(api):
    assert launch(*GROUP, kubeconfig=api.path).returncode == 0
    started = time.monotonic()
    timed_out = launch("wait", "r2", "--timeout", "2", "--interval", "0.5", kubeconfig=api.path)
    assert timed_out.returncode == 5 and "still Pending after 2 s" in timed_out.stderr
    assert time.monotonic() - started < 30
    _jobset_status(api, "r2", {"conditions": [{"type": "Completed", "status": "True", "reason": "AllJobsCompleted",
                                               "message": "jobset completed successfully"}]})
    done = launch("wait", "r2", kubeconfig=api.path)
    assert done.returncode == 0 and done.stdout.startswith("r2: Succeeded"), done.stderr
    _jobset_status(api, "r2", {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                               "message": "jobset failed due to reaching max number of restarts"}]})
    failed = launch("wait", "r2", "--timeout", "60", kubeconfig=api.path)
    assert failed.returncode == 4 and "max number of restarts" in failed.stdout
    missing = launch("wait", "nope", kubeconfig=api.path)
    assert missing.returncode == 2 and error_lines(missing.stderr)[0].startswith("error: not found: no run nope")


def test_events_of_a_runs_objects(api):
    assert launch(*GROUP, kubeconfig=api.path).returncode == 0
    for i, (kind, name, reason, message) in enumerate([
            ("JobSet", "r2", "RestartJobSetAndIgnoreMaxRestarts", "restarting the group"),
            ("Pod", "r2-worker-0-1-abcde", "Killing", "Stopping container trainer"),
            ("Pod", "other-0-xyz", "Scheduled", "not ours")]):
        api.put("events", {"apiVersion": "v1", "kind": "Event",
                           "metadata": {"name": f"e{i}", "namespace": "default"},
                           "involvedObject": {"kind": kind, "name": name, "namespace": "default"},
                           "reason": reason, "message": message, "type": "Normal",
                           "lastTimestamp": f"2026-11-22T10:0{i}:00Z", "count": 1})
    result = launch("events", "r2", kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "JobSet/r2  RestartJobSetAndIgnoreMaxRestarts: restarting the group" in lines[0]
    assert "Pod/r2-worker-0-1-abcde  Killing" in lines[1]


def test_logs_previous_shows_the_last_attempt(api):
    assert launch(*GROUP, kubeconfig=api.path).returncode == 0
    api.put("pods", _pod("r2-worker-0-1-old", "r2", 1, "Failed", 137))
    api.logs[("default", "r2-worker-0-1-old")] = "killed attempt\n"
    none = launch("logs", "r2", "--worker", "1", "--previous", kubeconfig=api.path)
    assert none.returncode == 2 and "no previous attempt of worker 1" in none.stderr
    newer = _pod("r2-worker-0-1-new", "r2", 1, "Running")
    newer["metadata"]["creationTimestamp"] = "2026-11-22T11:00:00Z"
    api.put("pods", newer)
    api.logs[("default", "r2-worker-0-1-new")] = "current attempt\n"
    assert launch("logs", "r2", "--worker", "1", kubeconfig=api.path).stdout == "current attempt\n"
    previous = launch("logs", "r2", "--worker", "1", "--previous", kubeconfig=api.path)
    assert previous.returncode == 0 and previous.stdout == "killed attempt\n"


def test_cancel_deletes_the_jobset_with_foreground_propagation(api):
    assert launch(*GROUP, kubeconfig=api.path).returncode == 0
    result = launch("cancel", "r2", kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    deletes = [(path, body) for method, path, body in api.requests if method == "DELETE"]
    assert deletes == [("/apis/jobset.x-k8s.io/v1alpha2/namespaces/default/jobsets/r2",
                        {"propagationPolicy": "Foreground"})]
    assert ("jobsets", "default", "r2") not in api.objects


def test_list_shows_jobsets_and_jobs_but_not_a_jobsets_own_jobs(api):
    assert launch(*GROUP, kubeconfig=api.path).returncode == 0
    single = launch("submit", "--image", "i", "--output-dir", "gs://b/r", "--run", "r1", kubeconfig=api.path)
    assert single.returncode == 0, single.stderr
    child = {"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": "r2-worker-0", "namespace": "default",
                          "labels": {"app.kubernetes.io/name": "mnist-trainer",
                                     "jobset.sigs.k8s.io/jobset-name": "r2"}},
             "spec": {"template": {"spec": {"containers": []}}}, "status": {}}
    api.put("jobs", child)
    result = launch("list", kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[:2] for line in result.stdout.splitlines()] == [["r1", "Job"], ["r2", "JobSet"]]


@pytest.mark.parametrize("args, code, message", [
    (["status", "missing"], 2, "error: not found: no run missing"),
    (["--namespace", "forbidden", "status", "r1"], 2, "error: forbidden: your account may not read JobSet"),
    (["--namespace", "quota", "submit", "--image", "i:1", "--output-dir", "gs://b/r", "--run", "r1"], 2,
     "error: refused by a resource quota: exceeded quota"),
    (["cancel", "missing"], 2, "error: not found: no run missing"),
    (["events", "missing"], 2, "error: not found: no run missing"),
])
def test_api_refusals_are_one_clear_line(api, args, code, message):
    result = launch(*args, kubeconfig=api.path)
    assert result.returncode == code
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr


@pytest.mark.parametrize("command", [["status", "r1"], ["list"], ["wait", "r1"], ["events", "r1"], ["cancel", "r1"],
                                     GROUP])
def test_every_api_call_is_bounded_by_the_request_timeout(api, command):
    started = time.monotonic()
    result = launch(*command, "--namespace", "slow", "--request-timeout", "1", kubeconfig=api.path)
    assert time.monotonic() - started < api.hang + 10
    assert result.returncode == 3 and len(error_lines(result.stderr)) == 1, result.stderr
    assert error_lines(result.stderr)[0].startswith("error: cannot reach the Kubernetes API")


def test_no_cluster_and_unreachable_cluster(tmp_path):
    result = launch("list")
    assert result.returncode == 3 and error_lines(result.stderr)[0].startswith("error: no Kubernetes cluster")
    down = KubeAPI()
    path = tmp_path / "kubeconfig"
    path.write_text(down.kubeconfig())
    down.stop()
    result = launch("list", kubeconfig=str(path))
    assert result.returncode == 3 and error_lines(result.stderr)[0].startswith("error: cannot reach the Kubernetes API")


def test_tensorboard_is_created_then_updated(api):
    args = ["tensorboard", "--image", "img:1", "--logdir", "gs://b/runs"]
    assert launch(*args, kubeconfig=api.path).returncode == 0
    result = launch(*args, kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    assert "port-forward svc/mnist-trainer-tensorboard" in result.stdout
    methods = [m for m, p, _ in api.requests if "deployments" in p]
    assert methods == ["POST", "POST", "PATCH"]
    args = api.objects[("deployments", "default", "mnist-trainer-tensorboard")]["spec"]["template"]["spec"]
    assert args["containers"][0]["args"][:2] == ["--logdir", "gs://b/runs"]


@pytest.mark.parametrize("command, account", [("submit", "mnist-trainer"), ("tensorboard", "mnist-trainer-tensorboard")])
def test_a_service_account_is_annotated_only_when_a_google_one_is_given(api, command, account):
    def run(name: str, *options: str, kubeconfig: str = api.path) -> subprocess.CompletedProcess:
        where = ["--output-dir", "gs://b/runs", "--run", name] if command == "submit" else ["--logdir", "gs://b/runs"]
        return launch(command, "--image", "img:1", *where, *options, kubeconfig=kubeconfig)

    key = ("serviceaccounts", "default", account)
    api.put("serviceaccounts", {"metadata": {"name": account, "namespace": "default",
                                             "annotations": {"set-by": "the cluster's admin"}}})
    assert run("sa1").returncode == 0
    assert api.objects[key]["metadata"]["annotations"] == {"set-by": "the cluster's admin"}  # left alone
    assert not [m for m, p, _ in api.requests if m == "PATCH" and "serviceaccounts" in p]
    email = "trainer@p.iam.gserviceaccount.com"
    result = run("sa2", "--gcp-service-account", email)
    assert result.returncode == 0, result.stderr
    assert api.objects[key]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == email
    dry = run("sa3", "--dry-run", kubeconfig="/nonexistent")
    written = next(o for o in yaml.safe_load_all(dry.stdout) if o["kind"] == "ServiceAccount")
    assert written["metadata"]["name"] == account and "annotations" not in written["metadata"]


@pytest.mark.parametrize("command", ["submit", "status", "wait", "events", "logs", "cancel", "list", "render",
                                     "tensorboard"])
def test_every_launcher_command_has_help(command):
    result = launch(command, "--help")
    assert result.returncode == 0 and "usage: python -m trainer.launch" in result.stdout
    options = result.stdout.split("options:\n")[1]
    for entry in re.split(r"\n(?=  -)", options):  # a flag and its help: every one shows its default
        line = " ".join(entry.split())
        assert line.startswith("-h") or "default" in line or "(required)" in line, line
