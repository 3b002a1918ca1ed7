"""The Makefile's defaults as a new user meets them: a local image needs no registry, the cluster goals say in one
line what they miss before anything is built, `make local` gives the container the GPUs NVIDIA's driver
lists and tells the trainer how many, and the project installs without a word. The real make, reading the real Makefile
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


def test_every_submit_and_tensorboard_option_has_a_make_variable_the_launcher_accepts():
    common = ["REGISTRY=registry.example/team/mnist", "BUCKET=my-runs", "CONTAINER=docker", "TAG=v1"]
    submit = _launch_args(_make("-n", "submit", *common, "SPOT=1", "MAX_RUNTIME=7200", "RETRIES=2", "QUEUE=team-a",
                                "PRIORITY=high", "GCP_SERVICE_ACCOUNT=trainer@p.iam.gserviceaccount.com",
                                "GPU_TYPE=nvidia-l4", "RUN=r1").stdout)
    assert (submit.spot, submit.max_runtime, submit.retries, submit.queue, submit.priority, submit.gpu_type,
            submit.run) == (True, 7200, 2, "team-a", "high", "nvidia-l4", "r1")
    assert submit.gcp_service_account == "trainer@p.iam.gserviceaccount.com"
    assert not _launch_args(_make("-n", "submit", *common, "SPOT=0").stdout).spot
    board = _launch_args(_make("-n", "tensorboard", *common,
                               "TENSORBOARD_GCP_SERVICE_ACCOUNT=board@p.iam.gserviceaccount.com").stdout)
    assert board.gcp_service_account == "board@p.iam.gserviceaccount.com"


def _launch_args(commands: str):
    """The launcher's parsed arguments in the command `make -n` prints."""
    from trainer.launch.cli import parse

    words = one_line(commands).split()
    start = words.index("trainer.launch") + 1
    return parse(words[start:words.index("--", start) if "--" in words[start:] else len(words)])


@pytest.mark.parametrize("goal", ["push", "submit", "tensorboard", "gpu-check"])
def test_the_cluster_goals_and_gpu_check_build_the_gpu_flavour_even_when_told_cpu(goal):
    commands = _make("-n", goal, "REGISTRY=registry.example/team/mnist", "BUCKET=my-runs", "CONTAINER=docker",
                     "TAG=v1", "FLAVOUR=cpu").stdout
    assert ("docker build -f docker/Dockerfile --build-arg FLAVOUR=gpu -t registry.example/team/mnist/mnist-trainer:v1 "
            in one_line(commands))


def test_make_local_builds_the_cpu_flavour_without_gpus_and_the_gpu_flavour_with_them(tmp_path):
    without = one_line(_make("-n", "local", "CONTAINER=docker", "TAG=v1", path=_driver_listing(tmp_path, 0)).stdout)
    assert "--build-arg FLAVOUR=cpu -t localhost/mnist-trainer:v1-cpu ." in without
    assert " localhost/mnist-trainer:v1-cpu train " in without
    with_gpus = one_line(_make("-n", "local", "CONTAINER=docker", "TAG=v1", path=_driver_listing(tmp_path, 2)).stdout)
    assert "--build-arg FLAVOUR=gpu -t localhost/mnist-trainer:v1 ." in with_gpus
    assert "--gpus 2 localhost/mnist-trainer:v1 train " in with_gpus


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


def _driver_listing(tmp_path, gpus: int) -> str:
    """A folder holding an `nvidia-smi` that lists `gpus` GPUs, as NVIDIA's driver does (`nvidia-smi -L`)."""
    driver = tmp_path / f"driver-{gpus}"
    driver.mkdir()
    lines = "".join(f"GPU {i}: NVIDIA L4 (UUID: GPU-{i})\\n" for i in range(gpus))
    (driver / "nvidia-smi").write_text(f'#!/bin/sh\n[ "$1" = -L ] && printf "{lines}"\nexit 0\n')
    (driver / "nvidia-smi").chmod(0o755)
    return str(driver)


@pytest.mark.parametrize("container, gpu_flags, one_gpu", [
    ("docker", "--gpus 2 ", "--gpus 1 "),
    ("podman", "--device nvidia.com/gpu=0 --device nvidia.com/gpu=1 ", "--device nvidia.com/gpu=0 localhost/")])
def test_make_local_gives_the_container_the_gpus_the_driver_lists_and_tells_the_trainer(tmp_path, container,
                                                                                         gpu_flags, one_gpu):
    driver = _driver_listing(tmp_path, 2)
    with_driver = one_line(_make("-n", "-o", "image", "local", f"CONTAINER={container}", path=driver).stdout)
    assert gpu_flags in with_driver
    assert with_driver.rstrip().endswith("--expect-gpus 2")  # an image whose CUDA stack fails exits 71, not CPU
    one = one_line(_make("-n", "-o", "image", "local", f"CONTAINER={container}", "LOCAL_GPUS=1", path=driver).stdout)
    assert one_gpu in one and one.rstrip().endswith("--expect-gpus 1")
    for told_not_to in (_make("-n", "-o", "image", "local", f"CONTAINER={container}", "LOCAL_GPUS=0", path=driver),
                        _make("-n", "-o", "image", "local", f"CONTAINER={container}",
                              path=_driver_listing(tmp_path, 0))):  # a driver that lists no GPU
        assert told_not_to.returncode == 0, told_not_to.stderr
        assert "--gpus" not in told_not_to.stdout and "nvidia.com/gpu" not in told_not_to.stdout
        assert "--expect-gpus" not in told_not_to.stdout


def test_make_local_with_buildah_refuses_gpus_it_cannot_give(tmp_path):
    line = _one_error_line(_make("-n", "-o", "image", "local", "CONTAINER=buildah", path=_driver_listing(tmp_path, 1)))
    assert "error: make local cannot give a container GPUs with buildah" in line and "LOCAL_GPUS=0" in line
    assert _make("-n", "-o", "image", "local", "CONTAINER=buildah", "LOCAL_GPUS=0").returncode == 0


def test_make_local_needs_a_number_of_gpus():
    line = _one_error_line(_make("-n", "-o", "image", "local", "CONTAINER=docker", "LOCAL_GPUS=all"))
    assert "error: make local needs LOCAL_GPUS=N, a number of GPUs (0: none), got 'all'" in line


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


def test_image_sizes_with_docker_says_it_needs_buildah_or_podman_before_building():
    line = _one_error_line(_make("image-sizes", "CONTAINER=docker"))
    assert "error: make image-sizes needs buildah or podman" in line


def test_make_test_says_why_each_test_skipped_and_under_ci_a_skip_fails_naming_the_test_and_what_was_missing(
        tmp_path):
    command = one_line(_make("-n", "test", "PYTEST_ARGS=").stdout).split(" -m pytest ")[1].split()
    assert "-rs" in command  # pytest's summary then lists every skip with its reason
    (tmp_path / "test_needs.py").write_text("import pytest\n\n\n"
                                            "@pytest.mark.skipif(True, reason='needs buildah (apt-get install buildah)')\n"
                                            "def test_image():\n    pass\n\n\n"
                                            "def test_plain():\n    pass\n")
    results = {}
    for ci in ("", "true"):  # the suite's own conftest.py, as a plugin, on a file of its own
        results[ci] = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-rs", "-p",
                                      "no:cacheprovider", str(tmp_path / "test_needs.py")], cwd=tmp_path,
                                     capture_output=True, text=True, timeout=300,
                                     env={**os.environ, "CI": ci, "PYTHONPATH": os.path.join(ROOT, "tests")})
    user, ci = results[""], results["true"]
    assert user.returncode == 0 and "1 passed, 1 skipped" in user.stdout, user.stdout[-2000:]
    assert "SKIPPED [1] test_needs.py:4: needs buildah (apt-get install buildah)" in user.stdout, user.stdout[-2000:]
    assert ci.returncode == 1 and "1 passed, 1 error" in ci.stdout, ci.stdout[-2000:]  # an error at its set-up
    assert "test_needs.py::test_image was skipped, which CI=true does not allow: needs buildah (apt-get install " \
           "buildah)" in ci.stdout, ci.stdout[-2000:]
