"""The Makefile's defaults as a new user meets them: a local image needs no registry, the cluster goals say in one
line what they miss before anything is built, `make local` gives the container the host's GPUs only where
NVIDIA's driver is installed, and the project installs without a word. The real make, reading the real Makefile
(`-n` where a goal would build)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, one_line


def _make(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{path}:{os.environ['PATH']}" if path else os.environ["PATH"]}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # nothing ran: not the install, not the image build
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("goal", ["push", "submit", "tensorboard"])
def test_cluster_goals_without_a_registry_say_so_before_building(goal):
    line = _one_error_line(_make(goal, "BUCKET=my-runs"))
    assert f"error: make {goal} needs REGISTRY=HOST/PATH" in line


@pytest.mark.parametrize("goals", [["submit"], ["tensorboard"], ["push", "submit"]])
def test_cluster_goals_without_a_bucket_say_so_before_building(goals):
    line = _one_error_line(_make(*goals, "REGISTRY=registry.example/team/mnist"))
    assert f"error: make {goals[-1]} needs BUCKET=NAME" in line


def test_submit_pushes_to_the_registry_and_trains_into_the_bucket():
    commands = _make("-n", "submit", "REGISTRY=registry.example/team/mnist", "BUCKET=my-runs", "CONTAINER=docker",
                     "TAG=v1", "GPUS=4").stdout
    assert "docker push registry.example/team/mnist/mnist-trainer:v1" in commands
    launch = one_line(commands)
    assert ("-m trainer.launch --namespace default submit --image registry.example/team/mnist/mnist-trainer:v1 "
            "--output-dir gs://my-runs/runs --gpus 4 --workers 1") in launch


def test_tensorboard_runs_an_image_it_has_pushed():
    commands = _make("-n", "tensorboard", "REGISTRY=registry.example/team/mnist", "BUCKET=my-runs",
                     "CONTAINER=docker", "TAG=v1").stdout
    push = commands.index("docker push registry.example/team/mnist/mnist-trainer:v1")
    assert commands.index("tensorboard --image registry.example/team/mnist/mnist-trainer:v1 "
                          "--logdir gs://my-runs/runs") > push


def test_image_and_local_need_no_registry():
    for goal in ("image", "local"):
        result = _make("-n", goal, "CONTAINER=docker", "TAG=v1")
        assert result.returncode == 0, result.stderr
        assert "localhost/mnist-trainer:v1" in result.stdout


@pytest.mark.parametrize("container, gpu_flag", [("docker", "--gpus all"), ("podman", "--device nvidia.com/gpu=all")])
def test_make_local_passes_gpus_only_where_the_nvidia_driver_is(tmp_path, container, gpu_flag):
    without = _make("-n", "-o", "image", "local", f"CONTAINER={container}").stdout
    driver = tmp_path / "bin"
    driver.mkdir()
    (driver / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (driver / "nvidia-smi").chmod(0o755)
    with_driver = _make("-n", "-o", "image", "local", f"CONTAINER={container}", path=str(driver)).stdout
    told_not_to = _make("-n", "-o", "image", "local", f"CONTAINER={container}", "LOCAL_GPUS=0", path=str(driver)).stdout
    has_driver = subprocess.run(["sh", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0
    assert (gpu_flag in without) == has_driver
    assert gpu_flag in with_driver
    assert gpu_flag not in told_not_to


def test_the_project_installs_editable_without_a_word(tmp_path):
    # make install's project step (the venv's pinned setuptools, no build isolation), without the dependencies
    # the venv already holds: a fresh install must not greet the user with setuptools' warnings.
    # --ignore-installed: into the prefix only, leaving the venv's own install of the project alone.
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--ignore-installed", "-c", "docker/constraints.txt", "--prefix", str(tmp_path),
                             "-e", "."],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    paths = list(tmp_path.glob("lib/python*/site-packages/__editable__.*.pth"))
    assert [p.read_text().split() for p in paths] == [[ROOT]]  # the code is used where it is edited
