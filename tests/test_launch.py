"""The launcher without a cluster: manifests against the official Kubernetes schemas (and JobSet's API), run
names, flags, dry runs; and, through an API stand-in, only what the real control plane of tests/test_cluster.py
cannot show here: an older Kubernetes, a Kueue without v1beta2 or none, a server that never answers."""

from __future__ import annotations

import dataclasses
import glob
import json
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
from gcs import free_port
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


# The stand-in API server: no Kubernetes release before 1.34 is served as a Go module here, so no older real one.
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


# The real Kueue of the local control plane serves v1beta2 and v1beta1 (tests/test_cluster.py); a Kueue that serves
# only v1beta1 (before 0.15) or none at all is the stand-in's: only Kueue 0.17 is served as a Go module here.
@pytest.mark.parametrize("kueue", [("v1beta1",), ()])
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


# The stand-in API server: one that accepts connections and never answers (namespace "slow").
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
    path = tmp_path / "kubeconfig"  # a server where nothing listens
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "gone",
                                "clusters": [{"name": "gone", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
                                "users": [{"name": "me", "user": {"token": "t"}}],
                                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "me"}}]}))
    result = launch("list", kubeconfig=str(path))
    assert result.returncode == 3 and error_lines(result.stderr)[0].startswith("error: cannot reach the Kubernetes API")


def test_a_dry_run_names_an_unannotated_service_account_unless_a_google_one_is_given():
    for command, account, where in (("submit", "mnist-trainer", ["--output-dir", "gs://b/runs", "--run", "sa"]),
                                    ("tensorboard", "mnist-trainer-tensorboard", ["--logdir", "gs://b/runs"])):
        for email in ("", "trainer@p.iam.gserviceaccount.com"):
            extra = ["--gcp-service-account", email] if email else []
            dry = launch(command, "--image", "img:1", *where, *extra, "--dry-run")
            written = next(o for o in yaml.safe_load_all(dry.stdout) if o["kind"] == "ServiceAccount")
            assert written["metadata"]["name"] == account
            assert written["metadata"].get("annotations", {}).get("iam.gke.io/gcp-service-account", "") == email


@pytest.mark.parametrize("command", ["submit", "status", "wait", "events", "logs", "cancel", "list", "render",
                                     "tensorboard"])
def test_every_launcher_command_has_help(command):
    result = launch(command, "--help")
    assert result.returncode == 0 and "usage: python -m trainer.launch" in result.stdout
    options = result.stdout.split("options:\n")[1]
    for entry in re.split(r"\n(?=  -)", options):  # a flag and its help: every one shows its default
        line = " ".join(entry.split())
        assert line.startswith("-h") or "default" in line or "(required)" in line, line
