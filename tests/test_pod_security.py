"""Every pod the launcher creates passes the "restricted" Pod Security Standard (tests/pod_security.py, written
from the Kubernetes documentation), runs as the image's own user with a read-only root filesystem, and the
shared TensorBoard is probed, bounded and reachable only inside the cluster."""

from __future__ import annotations

import copy
import glob
import os
import re

import pytest
import yaml

from conftest import ROOT
from pod_security import pod_specs, violations
from trainer.launch.manifests import IMAGE_UID, SCRATCH, TMP, JobSpec, tensorboard_objects, training_objects

SPECS = {
    "single node, GPUs": JobSpec(run="r1", image="img:1", output_dir="gs://b/runs", gpus=4, gpu_type="nvidia-l4"),
    "CPU only": JobSpec(run="r3", image="img:1", output_dir="gs://b/runs", gpus=0),
    "multi-worker, queued": JobSpec(run="r5", image="img:1", output_dir="gs://b/runs", workers=3, queue="team-a"),
}


def _objects() -> list[tuple[str, dict]]:
    found = [(name, obj) for name, spec in SPECS.items() for obj in training_objects(spec)]
    found += [("tensorboard", obj) for obj in tensorboard_objects("img:1", "gs://b/runs")]
    for path in sorted(glob.glob(os.path.join(ROOT, "k8s", "*.yaml"))):
        found += [(os.path.basename(path), obj) for obj in yaml.safe_load_all(open(path)) if obj]
    return found


@pytest.mark.parametrize("name, obj", _objects(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_pod_passes_the_restricted_standard(name, obj):
    for where, pod in pod_specs(obj):
        assert violations(pod) == [], (name, where)
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == IMAGE_UID
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert TMP in mounts, (name, mounts)  # what the processes write (HOME included), on an emptyDir
            if container["name"] == "trainer":
                assert SCRATCH in mounts


def test_the_pods_user_is_the_images_user():
    dockerfile = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    assert re.search(rf"useradd --create-home --uid {IMAGE_UID} --gid {IMAGE_UID} trainer\b", dockerfile)
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in dockerfile
    assert re.search(rf"^ *HOME={TMP}$", dockerfile, re.M)  # any user writes HOME, and pods mount an emptyDir there


def test_the_checker_finds_what_the_standard_forbids():
    [job] = training_objects(SPECS["CPU only"])
    pod = job["spec"]["template"]["spec"]
    bare = copy.deepcopy(pod)
    bare.pop("securityContext")
    bare["containers"][0].pop("securityContext")
    assert {v.split(":")[0] for v in violations(bare)} == {
        "privilege escalation", "running as non-root", "seccomp", "capabilities"}
    bad = copy.deepcopy(pod)
    bad["hostNetwork"] = True
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    context = bad["containers"][0]["securityContext"]
    context.update(privileged=True, runAsUser=0, capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]})
    bad["containers"][0]["ports"] = [{"containerPort": 80, "hostPort": 80}]
    assert {v.split(":")[0] for v in violations(bad)} == {
        "host namespaces", "volume types", "privileged", "running as non-root user", "capabilities",
        "capabilities (baseline)", "host ports"}


def test_tensorboard_is_probed_bounded_and_internal():
    deployment, service = tensorboard_objects("img:1", "gs://b/runs")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/"
    assert container["livenessProbe"]["httpGet"]["port"] == container["ports"][0]["containerPort"]
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    assert service["spec"]["type"] == "ClusterIP"
