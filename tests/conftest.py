"""Shared fixtures. The CPU is split into two logical devices before TensorFlow starts any op,
so MirroredStrategy runs with two replicas on machines without GPUs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable

from trainer.runtime import load_tensorflow, set_tensorflow_env

set_tensorflow_env()  # the same TensorFlow settings as `python -m trainer`, and its quiet start
load_tensorflow()  # (pytest-xdist's controller does not capture what TensorFlow's C++ side writes at import)

import pytest  # noqa: E402

from trainer.distribute import split_cpu  # noqa: E402

REPLICAS = 2
split_cpu(REPLICAS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the helpers import each other as tests.X, as bench and `python -m tests.cluster...` do
    sys.path.insert(0, ROOT)
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")
# The fault trials' seeds (FAULT_SEED=S or RUN_FAULT_SEED=S repeats a set), set once per session: pytest-xdist's
# workers inherit this environment, and every worker must draw the same parametrized trials. The group trials' is
# drawn at random; the run trials' counts this machine's runs of them (from a random start), so consecutive runs
# aim them at every moment in turn (test_fault_trials.py).
FAULT_ROTATION = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mnist-trainer",
                              "fault-rotation")
ROTATING = "PYTEST_XDIST_WORKER" not in os.environ and "RUN_FAULT_SEED" not in os.environ
if ROTATING:
    try:
        with open(FAULT_ROTATION) as _counter:
            os.environ["RUN_FAULT_SEED"] = str(int(_counter.read()))
    except (OSError, ValueError):
        os.environ["RUN_FAULT_SEED"] = str(random.SystemRandom().randrange(10**6))
os.environ.setdefault("FAULT_SEED", str(random.SystemRandom().randrange(10**6)))
# Every skip here is for something this machine lacks (root, buildah, debootstrap, podman, skopeo, the offline
# Fashion-MNIST copy, disk space, Go, the local control plane). A user's run skips and says why (make test: -rs);
# a CI run (CI=true, as CI services set it) that lacks one has not tested what it skipped, so the skip fails it.
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true, turn a skip into a failure that names the test and what was missing."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} was skipped, which CI=true does not allow: {reason.removeprefix('Skipped: ')}"


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the fault trials' seed (and what it aimed at) and, where it was rotating, count the run."""
    lines = list(dict.fromkeys(value for reports in terminalreporter.stats.values() for report in reports
                               for name, value in getattr(report, "user_properties", []) if name == "fault trials"))
    for line in lines:
        terminalreporter.write_line(f"fault trials: {line}")
    if lines and ROTATING:
        try:
            os.makedirs(os.path.dirname(FAULT_ROTATION), exist_ok=True)
            with open(FAULT_ROTATION, "w") as counter:
                counter.write(f"{int(os.environ['RUN_FAULT_SEED']) + 1}\n")
        except OSError:
            pass  # a read-only home: the next run draws a new start


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A data dir holding real MNIST (and Fashion-MNIST, where its offline copy is installed) as IDX files."""
    from trainer.datasets import import_packaged, packaged_copy

    folder = str(tmp_path_factory.mktemp("data"))
    for dataset in ("mnist", "fashion_mnist"):
        if packaged_copy(dataset):
            import_packaged(dataset, folder)
    return folder


def needs_offline_copy(dataset: str) -> pytest.MarkDecorator:
    """Skip unless the dataset's offline copy is installed (Fashion-MNIST: Debian's dataset-fashion-mnist)."""
    from trainer.datasets import packaged_copy

    return pytest.mark.skipif(not packaged_copy(dataset), reason=f"no offline copy of {dataset} is installed "
                              "(Fashion-MNIST: apt-get install dataset-fashion-mnist); TFDS would download it")


@pytest.fixture(scope="session")
def mnist(data_dir: str) -> dict:
    """Real MNIST train and test splits in memory."""
    from trainer.config import DataConfig
    from trainer.datasets import load_split

    config = DataConfig(dataset="mnist", data_dir=data_dir, data_source="idx")
    return {split: load_split(config, split) for split in ("train", "test")}


def image_entrypoint() -> list[str]:
    """The ENTRYPOINT of docker/Dockerfile (its exec form)."""
    with open(DOCKERFILE) as f:
        return json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", f.read(), re.M).group(1))


def one_line(commands: str) -> str:
    """Shell commands (as `make -n` prints them) as one line of words, line continuations dropped."""
    return " ".join(word for word in commands.split() if word != "\\")


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m trainer ARGS` in a fresh process (environment: ours, updated by `env`)."""
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def start_trainer(*args: str, env: dict | None = None, quiet: bool = False) -> subprocess.Popen:
    """Start `python -m trainer ARGS` in a fresh process: output piped as text, or discarded if `quiet`."""
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, stdout=output, stderr=output,
                            text=True, env={**os.environ, **(env or {})})


def process_state(pid: int) -> str:
    """The process's state letter in /proc (R, S, T when stopped, Z ...), or X once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def catches_sigterm(pid: int) -> bool:
    """True once the process has a handler for SIGTERM (its SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def wait_until(condition: Callable[[], object], timeout: float = 300, process: subprocess.Popen | None = None,
               interval: float = 0.2) -> bool:
    """Poll `condition` until it holds; False if `timeout` seconds pass or `process` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            return False
        time.sleep(interval)
    return True


def checkpoint_steps(names: Iterable[str]) -> list[int]:
    """The steps of the complete checkpoints (those with an index file) among file names, in order."""
    from trainer.run_dir import checkpoint_step

    return sorted(checkpoint_step(name) for name in names if name.endswith(".index"))


@pytest.fixture(scope="session")
def emulator():
    """A GCS-compatible server on loopback; google-cloud-storage reaches it via STORAGE_EMULATOR_HOST."""
    from gcs import Emulator

    server = Emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    yield server
    server.stop()


def _new_bucket(request) -> str:
    """A new, empty bucket named after the test, on the server STORAGE_EMULATOR_HOST names; its name."""
    from google.cloud import storage

    words = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())
    # Bucket names end at 63 characters; parametrized tests differ at the end of their names.
    name = f"test-{words[:40].strip('-')}-{hashlib.sha1(words.encode()).hexdigest()[:8]}"
    storage.Client().create_bucket(name)
    return name


@pytest.fixture
def bucket(emulator, request) -> str:
    """A new, empty bucket on the emulator; its name."""
    return _new_bucket(request)


@pytest.fixture(scope="session")
def fake_gcs():
    """fake-gcs-server on loopback: it enforces generation preconditions and serves requests concurrently."""
    from gcs import FakeGCS

    server = FakeGCS()
    yield server
    server.stop()


@pytest.fixture
def concurrent_bucket(fake_gcs, monkeypatch, request) -> str:
    """A new bucket on fake-gcs-server, which this test and the processes it starts reach. For tests that freeze
    a writer (SIGSTOP): the emulator serves one request at a time, so a client frozen half-way through one would
    block every other client, which real GCS never does."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    return _new_bucket(request)


def error_lines(stderr: str) -> list[str]:
    """Lines the trainer itself printed as errors (TensorFlow's own start-up logging aside)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def cnn_config(output_dir: str, data_dir: str, **overrides):
    """One epoch of the tutorial CNN on two logical CPU replicas, reading IDX files."""
    from trainer.config import config_from_args

    return config_from_args({"model": "cnn", "epochs": 1, "cpu_replicas": REPLICAS, "output_dir": output_dir,
                         "run": "cnn-e2e", "data_dir": data_dir, "data_source": "idx", **overrides})


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory, data_dir):
    """The tutorial CNN trained in-process for one epoch on two replicas: (config, run folder, metrics)."""
    from trainer.distribute import make_strategy
    from trainer.run_dir import RunFolder, open_for_training
    from trainer.train import train_and_evaluate

    output_dir = str(tmp_path_factory.mktemp("runs"))
    config = cnn_config(output_dir, data_dir, scratch_dir=str(tmp_path_factory.mktemp("scratch")))
    metrics = train_and_evaluate(open_for_training(config), make_strategy(config.runtime))
    return config, RunFolder(os.path.join(output_dir, "cnn-e2e")), metrics
