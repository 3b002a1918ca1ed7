"""The launcher: manifests against the official Kubernetes schemas, and real HTTP to an API stand-in."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml
import kubernetes_validate

from conftest import ROOT, error_lines
from kube import KubeAPI
from trainer.distribute import WORKERS_ENV, INDEX_ENV, configure_cluster
from trainer.launch.cli import render_examples
from trainer.launch.manifests import JobSpec, service_account, tensorboard_objects, training_objects

SCHEMAS = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
NEWEST = max((d.split("-")[0][1:] for d in os.listdir(SCHEMAS) if d.endswith("-local-strict")),
             key=lambda v: tuple(int(x) for x in v.split(".")))
SINGLE = JobSpec(run="r1", image="img:1", output_dir="gs://b/runs", trainer_args=("--model", "cnn"), gpus=4,
                 gpu_type="nvidia-l4")
MULTI = JobSpec(run="r2", image="img:1", output_dir="gs://b/runs", gpus=1, workers=2)
CPU_ONLY = JobSpec(run="r3", image="img:1", output_dir="gs://b/runs", gpus=0)
ALL_OBJECTS = [*training_objects(SINGLE), *training_objects(MULTI), *training_objects(CPU_ONLY),
               *tensorboard_objects("img:1", "gs://b/runs"), service_account("default", "sa@p.iam.gserviceaccount.com")]


@pytest.mark.parametrize("version", ["1.30.0", NEWEST])
@pytest.mark.parametrize("obj", ALL_OBJECTS, ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_every_manifest_validates_against_the_official_schema(obj, version):
    kubernetes_validate.validate(obj, version, strict=True)


def test_newest_schema_is_newer_than_1_30():
    assert tuple(int(x) for x in NEWEST.split(".")) > (1, 30, 0)


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
        ("FailJob", [2]), ("Ignore", [75]), ("Ignore", None)]
    assert rules[2]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert job["metadata"]["labels"]["mnist-trainer/run"] == "r1"
    assert container["args"][:8] == ["train", "--output-dir", "gs://b/runs", "--run", "r1", "--scratch-dir",
                                     "/scratch", "--grace-seconds"]
    assert container["args"][-2:] == ["--model", "cnn"]
    assert "completionMode" not in job["spec"] and "env" not in container
    text = yaml.safe_dump(job)
    assert "secret" not in text.lower() and "key.json" not in text


def test_multi_worker_job_and_tf_config_from_the_same_code(monkeypatch):
    service, job = training_objects(MULTI)
    assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == "r2"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert job["spec"]["template"]["spec"]["subdomain"] == "r2"
    env = {e["name"]: e["value"] for e in _container(job)["env"]}
    monkeypatch.setenv("TF_CONFIG", "")
    config = configure_cluster({**env, INDEX_ENV: "1"})  # what the container does at start
    assert config["cluster"]["worker"] == ["r2-0.r2:2222", "r2-1.r2:2222"]
    assert config["task"] == {"type": "worker", "index": 1}
    assert WORKERS_ENV in env


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


@pytest.mark.parametrize("args, message", [
    (["--", "--model", "nope"], "unknown model 'nope'"),
    (["--", "--epochs", "0"], "--epochs must be positive"),
    (["--workers", "3", "--", "--batch-size", "64"], "not divisible by 3 replicas"),
    (["--run", "Bad_Name"], "must be a DNS label"),
    (["--", "--run", "x"], "--run is set by the launcher"),
])
def test_bad_trainer_flags_are_refused_before_any_cluster_call(args, message):
    result = launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--dry-run", *args)
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1
    assert message in result.stderr


@pytest.fixture
def api(tmp_path):
    server = KubeAPI()
    path = tmp_path / "kubeconfig"
    path.write_text(server.kubeconfig())
    server.path = str(path)
    yield server
    server.stop()


def test_submit_creates_the_objects_and_409_on_a_second_submit(api):
    args = ["submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", "r2", "--gpus", "1",
            "--workers", "2"]
    result = launch(*args, kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "r2"
    assert api.objects[("jobs", "default", "r2")]["spec"] == training_objects(MULTI)[-1]["spec"]
    assert ("services", "default", "r2") in api.objects and ("serviceaccounts", "default", "mnist-trainer") in api.objects
    posts = [path for method, path, _ in api.requests if method == "POST"]
    assert posts == ["/api/v1/namespaces/default/serviceaccounts", "/api/v1/namespaces/default/services",
                     "/apis/batch/v1/namespaces/default/jobs"]
    again = launch(*args, kubeconfig=api.path)
    assert again.returncode == 2
    assert error_lines(again.stderr)[0].startswith("error: already exists: create Service default/r2")


def test_status_reads_job_conditions_and_pods(api):
    api.objects[("jobs", "default", "r1")] = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "r1", "namespace": "default"},
        "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                                "message": "Container trainer exited with 2"}]}}
    api.objects[("pods", "default", "r1-abc")] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "r1-abc", "namespace": "default", "labels": {"mnist-trainer/run": "r1"}},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "img:1", "imageID": "",
                   "ready": False, "restartCount": 0, "state": {"terminated": {"exitCode": 2}}}]}}
    api.logs[("default", "r1-abc")] = "error: unknown model 'x'\n"
    result = launch("status", "r1", kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "r1: Failed (active 0, succeeded 0, failed 1)"
    assert "PodFailurePolicy" in result.stdout and "pod r1-abc: Failed exit 2" in result.stdout
    logs = launch("logs", "r1", kubeconfig=api.path)
    assert logs.returncode == 0 and logs.stdout == "error: unknown model 'x'\n"
    listed = launch("list", kubeconfig=api.path)
    assert listed.returncode == 0


def test_cancel_deletes_with_foreground_propagation(api):
    assert launch("submit", "--image", "img:1", "--output-dir", "gs://b/runs", "--run", "r1",
                  kubeconfig=api.path).returncode == 0
    result = launch("cancel", "r1", kubeconfig=api.path)
    assert result.returncode == 0, result.stderr
    deletes = [(path, body) for method, path, body in api.requests if method == "DELETE"]
    assert deletes[0][0] == "/apis/batch/v1/namespaces/default/jobs/r1"
    assert deletes[0][1]["propagationPolicy"] == "Foreground"
    assert ("jobs", "default", "r1") not in api.objects


@pytest.mark.parametrize("args, code, message", [
    (["status", "missing"], 2, "error: not found: read job default/missing"),
    (["--namespace", "forbidden", "status", "r1"], 2, "error: forbidden: your account may not read job"),
    (["--namespace", "quota", "submit", "--image", "i:1", "--output-dir", "gs://b/r", "--run", "r1"], 2,
     "error: refused by a resource quota: exceeded quota"),
    (["cancel", "missing"], 2, "error: not found: delete job default/missing"),
])
def test_api_refusals_are_one_clear_line(api, args, code, message):
    result = launch(*args, kubeconfig=api.path)
    assert result.returncode == code
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr


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
