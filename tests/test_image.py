"""The image, built and run for real: `make image` with buildah builds docker/Dockerfile on a stand-in base (a
Debian root filesystem made by debootstrap: the official TensorFlow image cannot be pulled here), then the
trainer runs inside it, as the image's own user and, through `make local`, as an arbitrary one, writing a run
into a folder of the host that the host then evaluates. Builds are cached between runs: the base's root
filesystem in IMAGE_TEST_CACHE (default /var/cache/mnist-trainer-tests), the layers in the tests' own image
store; the images of earlier builds that no tag reaches any more are removed after each build.

The store is overlay in its own root (IMAGE_TEST_STORAGE) where this kernel mounts overlay file systems: a
cached build then takes seconds. Elsewhere it is vfs in buildah's default root, the Makefile's portable default,
which copies the whole file system for every step, cached or not (over a minute per cached build here)."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import ROOT, image_entrypoint, needs_offline_copy, one_line, run_cli
from gcs import free_port

CACHE = os.environ.get("IMAGE_TEST_CACHE", "/var/cache/mnist-trainer-tests")
BASE = "localhost/mnist-trainer-test-base:bookworm-slim"
IMAGE, TAG = "localhost/mnist-trainer", "test"
STORAGE = os.environ.get("IMAGE_TEST_STORAGE", "/var/lib/containers/mnist-trainer-tests")
TRAIN = ["train", "--model", "mlp300", "--epochs", "1", "--output-dir", "/runs"]
# Free space a build from nothing takes at its peak in the store, with a margin: vfs keeps a full copy of the file
# system per build step and per container (18.5 GB at the peak on the stand-in base, running included); overlay
# keeps each layer once (3.1 GB for the image and its base).
# The gpu flavour adds NVIDIA's CUDA wheels (a layer of about 6.5 GB).
NEEDED_GB = {"cpu": {"overlay": 8, "vfs": 22}, "gpu": {"overlay": 18, "vfs": 60}}
# What TensorFlow 2.21 loads on a GPU, and what loads it in turn: each must load in the gpu flavour.
CUDA_LIBRARIES = {"cudart", "cublas", "cublasLt", "cufft", "curand", "cusolver", "cusparse", "cudnn", "cudnn parts",
                  "nccl", "nvrtc", "nvJitLink", "cupti"}
DEBIAN_SOURCES = """Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("buildah") and shutil.which("debootstrap")),
                       reason="building images here needs root, buildah and debootstrap (.ci/run installs them)"),
    needs_offline_copy("fashion_mnist"),  # the image carries both datasets, imported offline here
]


@functools.cache
def buildah() -> tuple[str, ...]:
    """buildah on the tests' image store: overlay in its own root if this kernel mounts it, else vfs."""
    overlay = ("buildah", "--storage-driver", "overlay", "--root", STORAGE, "--runroot", "/run/containers/"
               + os.path.basename(STORAGE))
    probe = subprocess.run([*overlay, "from", "scratch"], capture_output=True, text=True)
    if probe.returncode == 0:
        container = probe.stdout.strip()
        mounted = subprocess.run([*overlay, "mount", container], capture_output=True).returncode == 0
        subprocess.run([*overlay, "rm", container], capture_output=True)
        if mounted:
            return overlay
    return ("buildah", "--storage-driver", "vfs")


def _run(command: list[str], timeout: float = 1800, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result


def _base_image() -> None:
    """The stand-in base: what debian:bookworm-slim is, made here (a minimal Debian bookworm root file system, no
    Python: the Dockerfile installs Debian's own), plus this machine's CA bundle as a local certificate, which
    the ca-certificates package the Dockerfile installs adds to the system bundle (pip inside must trust the
    package mirror's certificate)."""
    if subprocess.run([*buildah(), "inspect", BASE], capture_output=True).returncode == 0:
        return
    os.makedirs(CACHE, exist_ok=True)
    tarball = os.path.join(CACHE, "bookworm-minbase.tar")
    if not os.path.exists(tarball):
        rootfs = os.path.join(CACHE, "bookworm-minbase")
        shutil.rmtree(rootfs, ignore_errors=True)
        _run(["debootstrap", "--variant=minbase", "bookworm", rootfs])
        # As slim as the official image: no downloaded packages or package lists left behind.
        _run(["sh", "-c", f"rm -rf {rootfs}/var/cache/apt/archives/*.deb {rootfs}/var/lib/apt/lists/*"])
        # The package sources of the official image: the release, its updates and its security fixes.
        os.remove(os.path.join(rootfs, "etc/apt/sources.list"))
        with open(os.path.join(rootfs, "etc/apt/sources.list.d/debian.sources"), "w") as f:
            f.write(DEBIAN_SOURCES)
        local_certificates = os.path.join(rootfs, "usr/local/share/ca-certificates")
        os.makedirs(local_certificates, exist_ok=True)
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", os.path.join(local_certificates, "this-machine.crt"))
        _run(["tar", "-C", rootfs, "-cf", tarball + ".partial", "."])
        os.replace(tarball + ".partial", tarball)
        shutil.rmtree(rootfs)
    with open(os.path.join(CACHE, "Containerfile"), "w") as f:
        f.write("FROM scratch\nADD bookworm-minbase.tar /\nCMD [\"bash\"]\n")
    _run([*buildah(), "bud", "--isolation", "chroot", "-f", os.path.join(CACHE, "Containerfile"), "-t", BASE, CACHE])


def _store() -> dict:
    """Where buildah keeps layers and containers, and with which driver."""
    return json.loads(_run([*buildah(), "info"]).stdout)["store"]


def _make_buildah(flavour: str = "cpu") -> list[str]:
    """The make variables that build and run the test image (the cpu flavour unless told) with buildah on the
    tests' store."""
    return ["CONTAINER=buildah", f"BUILDAH={' '.join(buildah())}", f"BASE_IMAGE={BASE}", f"IMAGE={IMAGE}",
            f"TAG={TAG}", f"FLAVOUR={flavour}"]


def _prune_stale_images() -> None:
    """Remove images no tag reaches any more (an earlier build's code steps), leaf first, keeping every step the
    tagged images are built from (the build cache). A build that failed leaves its working container behind,
    which holds its image: such containers go first (only this file's tests use the store, one at a time)."""
    _run([*buildah(), "rm", "--all"])
    while dangling := _run([*buildah(), "images", "--all", "--quiet", "--filter", "dangling=true"]).stdout.split():
        _run([*buildah(), "rmi", *dangling])


def _room_to_build(flavour: str) -> None:
    """Skip unless the tests' image store has the free space a build of `flavour` from nothing needs."""
    store = _store()
    root, needed = store["GraphRoot"], NEEDED_GB[flavour][store["GraphDriverName"]]
    os.makedirs(root, exist_ok=True)
    free = shutil.disk_usage(root).free / 1e9
    if free < needed:
        pytest.skip(f"building the {flavour} image needs {needed} GB free under {root} ({store['GraphDriverName']} storage); "
                    f"{free:.1f} GB are free")


@pytest.fixture(scope="module")
def image() -> str:
    """The project's image (cpu flavour), built by `make image` with buildah on the stand-in base."""
    _room_to_build("cpu")
    _base_image()
    _run(["make", "image", *_make_buildah()], cwd=ROOT)
    _prune_stale_images()
    return f"{IMAGE}:{TAG}-cpu"


def _in_image(image: str, *args: str, user: str = "1000:1000", volumes: tuple | list = (),
              env: dict | None = None) -> subprocess.CompletedProcess:
    """The image's entrypoint with `args`, run by buildah as `user`, with `volumes` (HOST:CONTAINER) and `env`."""
    container = _run([*buildah(), "from", image]).stdout.strip()
    try:
        # `buildah run` takes a command, not the image's: its ENTRYPOINT, as the image records it, comes first.
        entrypoint = _run([*buildah(), "inspect", "--type", "container", "--format",
                           "{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}", container]).stdout.split()
        settings = [f"--env={name}={value}" for name, value in (env or {}).items()]
        settings += [f"--volume={volume}" for volume in volumes]
        return subprocess.run([*buildah(), "run", "--isolation", "chroot", "--user", user, *settings, container, "--",
                               *entrypoint, *args], capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([*buildah(), "rm", container], capture_output=True)


def _writable_folder(path) -> str:
    os.makedirs(path)
    os.chmod(path, 0o777)  # the container's users are not this test's
    return str(path)


def _evaluates_as_recorded(runs: str, run: str, data_dir: str) -> dict:
    metrics = json.load(open(os.path.join(runs, run, "metrics.json")))
    evaluated = run_cli("evaluate", "--output-dir", runs, "--run", run, "--data-dir", data_dir)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    return metrics


def test_the_image_trains_a_run_that_the_host_evaluates(image, tmp_path, data_dir):
    runs = _writable_folder(tmp_path / "runs")
    recorded = _run([*buildah(), "inspect", "--type", "image", "--format",
                     "{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}", image]).stdout.split()
    assert recorded == image_entrypoint()
    result = _in_image(image, *TRAIN, "--run", "img", volumes=[f"{runs}:/runs"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run folder: /runs/img" in result.stdout
    metrics = _evaluates_as_recorded(runs, "img", data_dir)
    assert metrics["data_source"] == "idx" and metrics["test_accuracy"] > 0.9
    saved = json.load(open(os.path.join(runs, "img", "config.json")))
    assert saved["data"]["data_dir"] == "/opt/data"  # the image's own data (TRAINER_DATA_DIR): nothing downloaded
    assert os.stat(os.path.join(runs, "img", "metrics.json")).st_uid == 1000


def test_make_local_runs_the_same_image_as_any_user(image, tmp_path, data_dir):
    runs = _writable_folder(tmp_path / "local")
    # `-o image`: the fixture has just built it with `make image`; the rest is what `make local` does.
    result = _run(["make", "-o", "image", "local", *_make_buildah(),
                   "LOCAL_USER=4321:4321", f"OUTPUT_DIR={runs}", "MODEL=mlp300", "EPOCHS=1", "RUN=local", "LOCAL_GPUS=0"],
                  cwd=ROOT)
    assert "run folder: /runs/local" in result.stdout
    _evaluates_as_recorded(runs, "local", data_dir)
    assert os.stat(os.path.join(runs, "local", "metrics.json")).st_uid == 4321  # no passwd entry: HOME is /tmp


@pytest.fixture
def podman_env(tmp_path) -> dict:
    """podman on the tests' image store (the same images and build cache) with chroot isolation for RUN steps."""
    if not shutil.which("podman"):
        pytest.skip("the podman path needs podman (apt-get install podman; .ci/run installs it)")
    storage = tmp_path / "storage.conf"
    store = _store()
    storage.write_text(f'[storage]\ndriver = "{store["GraphDriverName"]}"\ngraphroot = "{store["GraphRoot"]}"\n'
                       f'runroot = "{store["RunRoot"]}"\n')
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(storage), "BUILDAH_ISOLATION": "chroot"}


def test_without_a_docker_engine_make_image_uses_podman_and_builds_the_same_image(image, podman_env):
    # A docker client without a running engine (as here) counts as no docker.
    engine = shutil.which("docker") and subprocess.run(["docker", "version"], capture_output=True).returncode == 0
    database = _run(["make", "--no-print-directory", "-pn", "image"], cwd=ROOT, env=podman_env).stdout
    assert re.search(r"^CONTAINER := (\S+)$", database, re.M).group(1) == ("docker" if engine else "podman")
    make = ["make", "--no-print-directory", "CONTAINER=podman", f"BASE_IMAGE={BASE}", f"IMAGE={IMAGE}", f"TAG={TAG}",
            "FLAVOUR=cpu"]
    built = _run([*make, "image"], cwd=ROOT, env=podman_env)
    assert "podman build" in built.stdout
    podman_id = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image], env=podman_env).stdout.strip()
    assert podman_id == _run([*buildah(), "inspect", "--format", "{{.FromImageID}}", image]).stdout.strip()
    # `make local` then runs that image with podman (not run here: see docs/testing.md).
    local = _run([*make, "-n", "-o", "image", "local", "LOCAL_USER=4321:4321", "OUTPUT_DIR=/somewhere", "RUN=p",
                  "LOCAL_GPUS=0"], cwd=ROOT, env=podman_env).stdout
    assert (f"podman run --rm --user 4321:4321 -v /somewhere:/runs --shm-size 2g {image} train --output-dir /runs"
            in one_line(local))


@pytest.fixture
def registry(tmp_path):
    """A real image registry (Debian's docker-registry, the CNCF distribution registry) on loopback."""
    if not (shutil.which("docker-registry") and shutil.which("skopeo")):
        pytest.skip("pinning the base needs skopeo, and its test a registry (apt-get install skopeo docker-registry; "
                    ".ci/run installs them)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'blobs'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    server = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the registry did not start"
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def test_make_pin_base_pins_the_base_to_the_digest_its_tag_names(registry, tmp_path):
    _base_image()
    tag = f"{registry}/debian-stand-in:bookworm-slim"
    digest_file = tmp_path / "pushed.digest"
    _run([*buildah(), "push", "--tls-verify=false", "--digestfile", str(digest_file), BASE, f"docker://{tag}"])
    pushed = digest_file.read_text().strip()
    dockerfile = tmp_path / "Dockerfile"
    shutil.copy(os.path.join(ROOT, "docker", "Dockerfile"), dockerfile)
    result = _run(["make", "--no-print-directory", "pin-base", f"DOCKERFILE={dockerfile}", f"BASE_TAG={tag}",
                   "SKOPEO_ARGS=--tls-verify=false"], cwd=ROOT)
    pinned = f"{registry}/debian-stand-in@{pushed}"
    assert result.stdout.strip() == f"{dockerfile}: {tag} pinned as {pinned}"
    text = dockerfile.read_text()
    assert f"\n# base: {tag}\nARG BASE_IMAGE={pinned}\n" in text
    # The rest of the Dockerfile is untouched, and what the pin names is the image that was pushed.
    original = open(os.path.join(ROOT, "docker", "Dockerfile")).read().splitlines()
    changed = [line for line in text.splitlines() if line not in original]
    assert len(text.splitlines()) == len(original) and len(changed) == 2
    # The registry serves the pinned manifest, and its image is the base that was pushed (the same config).
    manifest = json.loads(_run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{pinned}"]).stdout)
    base_id = _run([*buildah(), "inspect", "--format", "{{.FromImageID}}", BASE]).stdout.strip()
    assert manifest["config"]["digest"] == f"sha256:{base_id}"
    # A tag the registry does not have: one error line, the Dockerfile untouched.
    missing = subprocess.run(["make", "--no-print-directory", "pin-base", f"DOCKERFILE={dockerfile}",
                              f"BASE_TAG={registry}/nothing:here", "SKOPEO_ARGS=--tls-verify=false"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "nothing:here" in missing.stderr
    assert dockerfile.read_text() == text


@pytest.fixture(scope="module")
def gpu_image() -> subprocess.CompletedProcess:
    """`make gpu-check`: the gpu flavour built on the stand-in base, then its check run inside as two users."""
    _room_to_build("gpu")
    _base_image()
    check = subprocess.run(["make", "--no-print-directory", "gpu-check", *_make_buildah("gpu")], cwd=ROOT,
                           capture_output=True, text=True, timeout=3600)
    _prune_stale_images()
    return check


def _check_lines(report: str) -> dict[str, str]:
    """`python -m trainer gpus` output: library -> its line."""
    rows = (re.match(r"(?:ok|MISSING|BAD) +(.+?)  +lib", line) for line in report.splitlines())
    return {row.group(1): row.string for row in rows if row}


def test_make_gpu_check_loads_every_cuda_library_tensorflow_needs_all_but_the_driver_as_any_user(gpu_image):
    assert gpu_image.returncode == 0, gpu_image.stdout[-3000:] + gpu_image.stderr[-3000:]
    reports = gpu_image.stdout.split("TensorFlow 2.21.0, built for CUDA 12.5.1 and cuDNN 9\n")[1:]
    assert len(reports) == 2  # as the image's user 1000, and as an arbitrary UID with no passwd entry
    for report in reports:
        lines = _check_lines(report)
        assert {name for name, line in lines.items() if line.startswith("ok ")} == CUDA_LIBRARIES, report
        assert lines["driver"].startswith("MISSING driver") and "libcuda.so.1" in lines["driver"]
        assert "the driver (libcuda.so.1) is the one thing missing" in report
        # Each at a version of CUDA 12 at 12.5 or newer, cuDNN 9 at 9.3 or newer, from the image's own wheels.
        cudart = re.search(r"libcudart\.so\.12 +12\.(\d+) +(\S+)", lines["cudart"])
        assert int(cudart.group(1)) >= 5 and cudart.group(2).startswith("/opt/venv/lib/python3.11/site-packages/nvidia/")
        assert int(re.search(r"libcudnn\.so\.9 +9\.(\d+)\.", lines["cudnn"]).group(1)) >= 3
        # cuSOLVER is not on the RUNPATH TensorFlow loads through: the image's LD_LIBRARY_PATH brings it.
        assert "site-packages/nvidia/cusolver/lib/libcusolver.so.11  (opened by TensorFlow)" in lines["cusolver"]


def test_without_the_images_library_path_tensorflow_does_not_find_cusolver(gpu_image):
    assert gpu_image.returncode == 0, gpu_image.stderr[-3000:]
    bare = _in_image(f"{IMAGE}:{TAG}", "gpus", env={"LD_LIBRARY_PATH": ""})
    assert bare.returncode == 71, bare.stdout + bare.stderr
    lines = _check_lines(bare.stdout)
    assert [name for name, line in lines.items() if not line.startswith("ok ")] == ["cusolver", "driver"]


def test_the_gpu_image_without_a_driver_names_it_in_its_one_error_line(gpu_image, tmp_path):
    assert gpu_image.returncode == 0, gpu_image.stderr[-3000:]
    result = _in_image(f"{IMAGE}:{TAG}", "train", "--model", "mlp300", "--output-dir", "/tmp/runs", "--run", "g",
                       "--expect-gpus", "1")
    assert result.returncode == 71 and result.stdout == ""
    trainer, *runner = result.stderr.splitlines()  # then buildah's own lines about the exit status
    assert trainer == ("error: this pod was given 1 GPU(s) but TensorFlow sees 0: no NVIDIA driver: libcuda.so.1 "
                       "not found (the node's driver is mounted into the container by NVIDIA's device plugin or "
                       "container toolkit; GKE mounts it at /usr/local/nvidia/lib64); not training on the CPU instead")
    assert all("exit" in line and "status 71" in line for line in runner), runner
