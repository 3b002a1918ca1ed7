"""Every request the trainer and TensorBoard make to the bucket is allowed by the role the docs grant them:
recorded by a proxy in front of the emulator over a run's whole life, mapped to the IAM permission Google's
documentation lists for it (tests/iam.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
import tensorflow as tf

from conftest import ROOT, run_cli, start_trainer, wait_until
from gcs import Proxy, Request, free_port
from iam import OBJECT_USER, OBJECT_VIEWER, Unmapped, outside, permissions
from trainer.launch.manifests import tensorboard_objects
from trainer.run_dir import POINTER
from trainer.storage import GCSStore

TRAIN = ["train", "--model", "mlp300", "--batch-size", "100", "--steps-per-loop", "20", "--epochs", "1"]
SHIPPING = ["--checkpoint-every", "200", "--ship-every", "0.5", "--lease-seconds", "3"]


def test_the_table_names_what_a_request_outside_the_role_needs():
    bucket_metadata = Request("GET", "127.0.0.1", "/storage/v1/b/runs?projection=noAcl&prettyPrint=false")
    assert outside([bucket_metadata], OBJECT_USER) == [f"{bucket_metadata} needs storage.buckets.get"]
    upload = Request("POST", "127.0.0.1", "/upload/storage/v1/b/runs/o?uploadType=multipart")
    assert outside([upload], OBJECT_VIEWER) == [f"{upload} needs storage.objects.create, storage.objects.delete"]
    with pytest.raises(Unmapped, match="POST 127.0.0.1/storage/v1/b/runs/acl"):
        permissions(Request("POST", "127.0.0.1", "/storage/v1/b/runs/acl"))


@pytest.fixture
def recorded(emulator):
    """A proxy in front of the emulator that records every request; the processes the test starts reach it."""
    proxy = Proxy(emulator.port)
    yield proxy
    proxy.stop()


def test_a_whole_run_needs_only_the_object_user_role(bucket, recorded, data_dir, mnist, tmp_path):
    env = {"STORAGE_EMULATOR_HOST": recorded.url, "TRAINER_JOB": "team/r"}
    store = f"gs://{bucket}/exp"
    args = [*TRAIN, *SHIPPING, "--output-dir", store, "--run", "r", "--data-dir", data_dir]
    seen: dict[str, int] = {}

    def stage(name: str) -> None:  # how many requests each stage of the run's life made
        seen[name] = len(recorded.requests) - sum(seen.values())

    # start, lease, training, shipping; SIGTERM: save, ship, give the lease up
    process = start_trainer(*args, "--scratch-dir", str(tmp_path / "a"), env=env)
    assert wait_until(lambda: GCSStore(f"{store}/r").read(POINTER), process=process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    stage("train until SIGTERM")
    # resume on another machine (empty scratch), finish, export
    result = run_cli(*args, "--scratch-dir", str(tmp_path / "b"), env=env)
    assert result.returncode == 0 and "resuming" in result.stderr, result.stderr[-3000:]
    stage("resume and finish")
    result = run_cli("evaluate", "--output-dir", store, "--run", "r", "--data-dir", data_dir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stage("evaluate")
    png = tmp_path / "seven.png"
    png.write_bytes(tf.io.encode_png(mnist["test"].images[0]).numpy())
    result = run_cli("predict", "--output-dir", store, "--run", "r", str(png), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stage("predict")
    result = run_cli("analyze", "--output-dir", store, "--run", "r", "--data-dir", data_dir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stage("analyze")

    assert all(seen.values()), seen  # every stage reached the bucket through the proxy
    assert outside(recorded.requests, OBJECT_USER) == []
    methods = {(r.method, r.path.split("?")[0].split("/o/")[0]) for r in recorded.requests}
    assert ("DELETE", f"/storage/v1/b/{bucket}") in methods  # the run deletes (upload parts, old checkpoints)


def _tensorboard_command(logdir: str, port: int) -> list[str]:
    """The TensorBoard Deployment's own command and arguments, on a port of this machine's loopback."""
    container = tensorboard_objects("img:1", logdir)[0]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--bind_all")] = "--host=127.0.0.1"
    return [os.path.join(os.path.dirname(sys.executable), container["command"][0]), *args]


def test_tensorboard_needs_only_the_object_viewer_role(bucket, emulator, data_dir, tmp_path):
    result = run_cli(*TRAIN, "--output-dir", f"gs://{bucket}/runs", "--run", "r", "--data-dir", data_dir,
                     "--scratch-dir", str(tmp_path / "scratch"))
    assert result.returncode == 0, result.stderr[-3000:]
    # TensorFlow's GCS file system calls Google's hosts over TLS (no emulator setting): through the proxy, which
    # ends that TLS with its own CA and answers for the metadata server, as GKE's does for Workload Identity.
    proxy = Proxy(emulator.port, ca=str(tmp_path))
    home = tmp_path / "home"  # no gcloud credentials file: the token comes from the metadata server
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env |= {"HOME": str(home), "http_proxy": proxy.url, "https_proxy": proxy.url, "no_proxy": "127.0.0.1",
            "CURL_CA_BUNDLE": proxy.ca}
    port = free_port()
    board = subprocess.Popen(_tensorboard_command(f"gs://{bucket}/runs", port), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def runs() -> set[str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as response:
                return set(json.loads(response.read()))
        except OSError:
            return set()

    try:
        loaded = wait_until(lambda: {"r/logs/train", "r/logs/test"} <= runs(), timeout=120, process=board,
                            interval=1)
        scalars = wait_until(lambda: _has_scalars(port, "r/logs/train"), timeout=60, process=board, interval=1)
    finally:
        board.terminate()
        _, stderr = board.communicate(timeout=30)
        proxy.stop()
    assert loaded and scalars, stderr[-3000:]
    assert {r.host for r in proxy.requests} == {"www.googleapis.com", "storage.googleapis.com"}
    assert outside(proxy.requests, OBJECT_VIEWER) == []


def _has_scalars(port: int, run: str) -> bool:
    """True once TensorBoard serves the run's loss, read from the event file's bytes."""
    query = urllib.parse.urlencode({"run": run, "tag": "loss"})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}",
                                    timeout=5) as response:
            return bool(json.loads(response.read()))
    except OSError:
        return False
