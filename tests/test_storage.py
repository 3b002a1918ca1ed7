"""Stores and the shipper against a real GCS-compatible server on loopback, and whole runs to gs://."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf
from google.cloud import storage

from bucket_invariant import observe
from conftest import ROOT, error_lines, run_cli, start_trainer, wait_until
from gcs import Emulator, Proxy
from trainer.lease import LEASE
from trainer.run_dir import POINTER, RunFolder, checkpoint_step, parse_pointer, restore
from trainer.shipper import Shipper
from trainer.storage import GCSStore, LocalStore

TRAIN = ["train", "--model", "mlp300", "--batch-size", "100", "--steps-per-loop", "20"]
TOTAL = 600  # steps of one mlp300 epoch at batch 100


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(str(tmp_path / "store"))
    name = request.getfixturevalue("bucket")
    return GCSStore(f"gs://{name}/some/prefix")


def test_store_contract(store, tmp_path):
    store.check()
    assert store.read("a/b.txt") is None and store.list() == {}
    store.write("a/b.txt", b"hello")
    (tmp_path / "f.bin").write_bytes(b"x" * 1000)
    store.upload(str(tmp_path / "f.bin"), "c/f.bin")
    assert store.list() == {"a/b.txt": 5, "c/f.bin": 1000} and store.list("c/") == {"c/f.bin": 1000}
    assert store.append("a/b.txt", b", world", 5) is True
    assert store.append("a/b.txt", b"!", 3) is False  # wrong offset: refused, object untouched
    assert store.read("a/b.txt") == b"hello, world"
    store.download("a/b.txt", str(tmp_path / "down" / "b.txt"))
    assert (tmp_path / "down" / "b.txt").read_bytes() == b"hello, world"
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting twice is fine
    assert store.read("a/b.txt") is None and list(store.list()) == ["c/f.bin"]


def _shipped(bucket: str, prefix: str) -> dict[str, bytes]:
    """The objects of a finished run in the bucket, but for its lease (the store's own), which must be given up."""
    client = storage.Client()
    found = {b.name[len(prefix) + 1:]: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=prefix + "/")}
    assert json.loads(found.pop(LEASE))["released"] is True
    return found


def _local_files(root: str) -> dict[str, bytes]:
    found = {}
    for folder, _, files in os.walk(root):
        for file in files:
            path = os.path.join(folder, file)
            found[os.path.relpath(path, root).replace(os.sep, "/")] = open(path, "rb").read()
    return found


def test_whole_run_to_gcs_is_byte_for_byte_and_evaluate_reads_it(bucket, data_dir, mnist, tmp_path):
    scratch = tmp_path / "scratch"
    result = run_cli(*TRAIN, "--epochs", "1", "--output-dir", f"gs://{bucket}/exp", "--run", "r1",
                     "--data-dir", data_dir, "--scratch-dir", str(scratch), "--ship-every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run folder: gs://{bucket}/exp/r1" in result.stdout
    stored = _shipped(bucket, "exp/r1")
    local = _local_files(str(scratch / "r1"))
    assert set(stored) == set(local)
    for name in set(local) - {POINTER}:
        assert stored[name] == local[name], name
    # The store's pointer is written by the shipper (naming only shipped checkpoints), not copied.
    assert parse_pointer(stored[POINTER])[0] == parse_pointer(local[POINTER])[0] == "ckpt-600"
    for name in ("config.json", "metrics.json", "model/saved_model.pb", "checkpoints/ckpt-600.index"):
        assert name in stored
    assert any(n.startswith("logs/train/") and "tfevents" in n for n in stored)

    result = run_cli("evaluate", "--output-dir", f"gs://{bucket}/exp", "--run", "r1", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["test_accuracy"] == json.loads(stored["metrics.json"])["test_accuracy"]
    png = tmp_path / "seven.png"
    png.write_bytes(tf.io.encode_png(mnist["test"].images[0]).numpy())
    result = run_cli("predict", "--output-dir", f"gs://{bucket}/exp", "--run", "r1", str(png))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\t")[1] == "7"


def test_event_files_are_appended_not_resent(bucket, emulator, tmp_path, monkeypatch):
    local = RunFolder(str(tmp_path / "run"))
    os.makedirs(local.path("logs", "train"))
    events = local.path("logs", "train", "events.out.tfevents.1.host")
    counter = Proxy(emulator.port, failure_rate=0.0)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", counter.url)  # count the bytes the store is sent
    store = GCSStore(f"gs://{bucket}/p")
    try:
        with Shipper(local, store, interval=3600) as shipper:
            with open(events, "wb") as f:
                f.write(b"a" * 100_000)
            assert shipper.flush(30)
            first = counter.body_bytes
            with open(events, "ab") as f:
                f.write(b"b" * 10)
            assert shipper.flush(30)
            second = counter.body_bytes - first
    finally:
        counter.stop()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    blob = storage.Client().bucket(bucket).get_blob("p/logs/train/events.out.tfevents.1.host")
    assert blob.download_as_bytes() == b"a" * 100_000 + b"b" * 10
    assert first > 100_000 and second < 5_000  # only the tail (and a compose request) went out
    assert not list(storage.Client().list_blobs(bucket, prefix="p/.uploads"))


def test_resume_on_an_empty_machine_from_the_bucket(bucket, data_dir, tmp_path):
    args = [*TRAIN, "--epochs", "2", "--output-dir", f"gs://{bucket}/exp", "--run", "r", "--data-dir", data_dir,
            "--checkpoint-every", "100", "--ship-every", "0.5", "--lease-seconds", "3"]
    job = {"TRAINER_JOB": "team/r"}  # pods of one Job: the new one waits out the dead one's lease
    process = start_trainer(*args, "--scratch-dir", str(tmp_path / "a"), env=job)
    store = GCSStore(f"gs://{bucket}/exp/r")
    assert wait_until(lambda: store.read(POINTER), process=process)  # a checkpoint is committed
    process.kill()  # the machine is gone, its scratch too
    process.wait()
    step = checkpoint_step(parse_pointer(store.read(POINTER))[0])
    assert 0 < step < 2 * TOTAL
    result = run_cli(*args, "--scratch-dir", str(tmp_path / "b"), env=job)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming gs://{bucket}/exp/r from step " in result.stderr
    resumed_from = int(result.stderr.split(f"resuming gs://{bucket}/exp/r from step ")[1].split()[0])
    assert resumed_from >= step
    metrics = json.loads(store.read("metrics.json"))
    assert metrics["steps"] == 2 * TOTAL and metrics["resumed_from_step"] == resumed_from


def test_sigterm_saves_ships_and_exits_75_then_resumes(bucket, data_dir, tmp_path):
    args = [*TRAIN, "--epochs", "2", "--output-dir", f"gs://{bucket}/exp", "--run", "r", "--data-dir", data_dir,
            "--checkpoint-every", "1000", "--ship-every", "0.5", "--scratch-dir", str(tmp_path)]
    process = start_trainer(*args)
    store = GCSStore(f"gs://{bucket}/exp/r")
    assert wait_until(lambda: store.list("logs/train/"), process=process)
    time.sleep(1.0)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - signalled < 25  # within the default grace
    assert process.returncode == 75, stderr[-3000:]
    assert f"shipped to gs://{bucket}/exp/r" in error_lines(stderr)[0]
    step = checkpoint_step(parse_pointer(store.read(POINTER))[0])
    assert 0 < step < 2 * TOTAL and step % 20 == 0  # saved at the step it stopped, not at a schedule
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from step {step} of {2 * TOTAL}" in result.stderr


def _latest_step(bucket: str) -> int:
    pointer = GCSStore(f"gs://{bucket}/exp/r").read(POINTER)
    return checkpoint_step(parse_pointer(pointer)[0]) if pointer else 0


def test_kill_9_at_random_moments_never_exposes_a_partial_checkpoint(bucket, data_dir, tmp_path):
    args = [*TRAIN, "--epochs", "2", "--output-dir", f"gs://{bucket}/exp", "--run", "r", "--data-dir", data_dir,
            "--checkpoint-every", "40", "--ship-every", "0.2", "--scratch-dir", str(tmp_path / "scratch")]
    outcomes, stop, failures = [], threading.Event(), []

    def watch() -> None:
        while not stop.is_set():
            try:
                outcomes.append(observe(f"gs://{bucket}/exp/r", str(tmp_path / f"obs{len(outcomes)}")))
            except AssertionError as violation:
                failures.append(str(violation))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rng = random.Random(7)
    steps_seen = []
    try:
        for _ in range(3):
            before = _latest_step(bucket)
            process = start_trainer(*args, quiet=True)
            # Wait until this process has shipped a checkpoint, then kill it at a random moment.
            wait_until(lambda: _latest_step(bucket) > before, 120, process, interval=0.1)
            time.sleep(rng.uniform(0.0, 3.0))
            process.kill()
            process.wait()
            steps_seen.append(_latest_step(bucket))
        result = run_cli(*args)
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > 0  # progress survives each kill
    assert not failures, failures[:3]
    assert outcomes.count("checked") >= 10
    assert observe(f"gs://{bucket}/exp/r", str(tmp_path / "final")) == "checked"


def test_a_flaky_server_is_retried_and_the_run_arrives_whole(emulator, data_dir, tmp_path):
    storage.Client().create_bucket("flaky")
    proxy = Proxy(emulator.port, failure_rate=0.25, seed=1)
    try:
        result = run_cli(*TRAIN, "--epochs", "1", "--output-dir", "gs://flaky/exp", "--run", "r",
                         "--data-dir", data_dir, "--scratch-dir", str(tmp_path), "--ship-every", "0.5",
                         env={"STORAGE_EMULATOR_HOST": proxy.url})
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.failures >= 5 and len(proxy.requests) > proxy.failures
    stored = _shipped("flaky", "exp/r")
    local = _local_files(str(tmp_path / "r"))
    assert set(stored) == set(local) and all(stored[n] == local[n] for n in set(local) - {POINTER})


def test_a_server_that_is_down_at_start_is_one_line_before_training(data_dir, tmp_path):
    from gcs import free_port

    result = run_cli(*TRAIN, "--output-dir", "gs://somewhere/exp", "--run", "r", "--data-dir", data_dir,
                     "--store-timeout", "3", "--scratch-dir", str(tmp_path),
                     env={"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 74
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "gs://somewhere/exp/r" in errors[0]
    assert not os.path.exists(tmp_path / "r" / "logs")  # no training started


def test_a_server_that_goes_down_fails_at_the_end_and_keeps_everything(data_dir, tmp_path):
    server = Emulator()
    env = {"STORAGE_EMULATOR_HOST": server.url}
    subprocess.run([sys.executable, "-c", "from google.cloud import storage; storage.Client().create_bucket('doomed')"],
                   env={**os.environ, **env}, check=True)
    args = [*TRAIN, "--epochs", "1", "--output-dir", "gs://doomed/exp", "--run", "r", "--data-dir", data_dir,
            "--scratch-dir", str(tmp_path), "--ship-every", "0.5", "--store-timeout", "3"]
    process = start_trainer(*args, env=env)
    assert wait_until(lambda: os.path.exists(tmp_path / "r" / "logs" / "train"), process=process)
    time.sleep(1.0)
    server.stop()
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 74, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1 and f"everything is kept in {tmp_path / 'r'}" in errors[0]
    assert "warning: store unreachable" in stderr
    for name in ("metrics.json", "model/saved_model.pb", "checkpoints/checkpoint"):
        assert os.path.exists(tmp_path / "r" / name)


def test_missing_bucket_and_missing_credentials_are_one_line_exit_2(emulator, data_dir, tmp_path):
    result = run_cli(*TRAIN, "--output-dir", "gs://no-such-bucket/exp", "--run", "r", "--data-dir", data_dir)
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: bucket gs://no-such-bucket does not exist"]
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="true")
    result = subprocess.run([sys.executable, "-m", "trainer", *TRAIN, "--output-dir", "gs://some-bucket/exp", "--run", "r",
                             "--data-dir", data_dir], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "no Google Cloud credentials" in errors[0]


def test_restore_brings_the_checkpoints_the_pointer_keeps_and_nothing_else(tmp_path):
    store = LocalStore(str(tmp_path / "store"))
    for step in (50, 100, 200):  # 50 is no longer named: left over, never restored
        store.write(f"checkpoints/ckpt-{step}.index", b"i")
        store.write(f"checkpoints/ckpt-{step}.data-00000-of-00001", b"d")
    store.write(POINTER, b'model_checkpoint_path: "ckpt-200"\nall_model_checkpoint_paths: "ckpt-100"\n'
                         b'all_model_checkpoint_paths: "ckpt-200"\n')
    store.write("config.json", b"{}")
    local = RunFolder(str(tmp_path / "scratch"))
    assert restore(store, local) == ["ckpt-100", "ckpt-200"]
    assert sorted(os.listdir(local.checkpoints)) == ["checkpoint", "ckpt-100.data-00000-of-00001", "ckpt-100.index",
                                                     "ckpt-200.data-00000-of-00001", "ckpt-200.index"]
    assert parse_pointer(open(local.path(POINTER), "rb").read()) == ("ckpt-200", ["ckpt-100", "ckpt-200"])
    assert os.path.exists(local.path("config.json")) and not os.path.exists(local.path("metrics.json"))


def _flip_bytes(data: bytes) -> bytes:
    """Bit rot: a few bytes inverted in the middle."""
    damaged = bytearray(data)
    for i in range(len(damaged) // 2, len(damaged) // 2 + 8):
        damaged[i] ^= 0xFF
    return bytes(damaged)


def test_a_damaged_newest_checkpoint_in_the_bucket_falls_back_to_an_older_one(bucket, data_dir, tmp_path):
    args = ["train", "--model", "mlp300", "--checkpoint-every", "200", "--output-dir", f"gs://{bucket}/exp",
            "--run", "r", "--data-dir", data_dir, "--scratch-dir", str(tmp_path)]
    assert run_cli(*args, "--epochs", "1").returncode == 0  # checkpoints 200, 400, 600
    blob = storage.Client().bucket(bucket).blob("exp/r/checkpoints/ckpt-600.data-00000-of-00001")
    blob.upload_from_string(_flip_bytes(blob.download_as_bytes()))
    result = run_cli(*args, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"checkpoint ckpt-600 of gs://{bucket}/exp/r does not load" in warnings[0]
    assert "Checksum does not match" in warnings[0] and "Traceback" not in result.stderr
    assert f"resuming gs://{bucket}/exp/r from step 400 of 1200" in result.stderr
    store = GCSStore(f"gs://{bucket}/exp/r")
    assert json.loads(store.read("metrics.json"))["steps"] == 1200
    assert parse_pointer(store.read(POINTER)) == ("ckpt-1200", ["ckpt-800", "ckpt-1000", "ckpt-1200"])
    assert observe(f"gs://{bucket}/exp/r", str(tmp_path / "check")) == "checked"


def test_a_run_with_no_intact_checkpoint_or_config_is_one_line_exit_2(data_dir, tmp_path):
    args = ["train", "--model", "mlp300", "--checkpoint-every", "300", "--output-dir", str(tmp_path / "runs"),
            "--run", "r", "--data-dir", data_dir]
    assert run_cli(*args, "--epochs", "1").returncode == 0  # checkpoints 300, 600
    folder = tmp_path / "runs" / "r"
    (folder / "metrics.json").write_text("{not json")
    result = run_cli(*args, "--epochs", "1")  # metrics.json is written again: a warning, then evaluated again
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: run" in result.stderr and "ignoring its unreadable metrics.json" in result.stderr
    assert json.loads((folder / "metrics.json").read_text())["steps"] == 600
    for data in folder.glob("checkpoints/*.data-*"):
        data.write_bytes(_flip_bytes(data.read_bytes()))
    result = run_cli(*args, "--epochs", "2")
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert errors == [f"error: no checkpoint of {folder} loads (ckpt-600, ckpt-300: all damaged); remove its "
                      "checkpoints/ to train it again from the start"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (folder / "config.json").write_bytes(b"\x00garbage")
    result = run_cli(*args, "--epochs", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: run {folder}: its config.json is unreadable")


def test_scratch_belongs_to_one_run(data_dir, tmp_path):
    """Two runs of one name in two output dirs get two scratch folders; a scratch folder a live trainer holds
    is refused to a second one (and left alone); a checkpoint of another model in scratch is never restored."""
    from trainer.config import config_from_args
    from trainer.run_dir import open_for_training, scratch_folder

    common = {"run": "same", "data_dir": data_dir}
    cnn = config_from_args({**common, "model": "cnn", "output_dir": str(tmp_path / "x")})
    mlp = config_from_args({**common, "model": "mlp300", "output_dir": str(tmp_path / "y")})
    assert scratch_folder(cnn, LocalStore(str(tmp_path / "x" / "same")).url).root != \
        scratch_folder(mlp, LocalStore(str(tmp_path / "y" / "same")).url).root
    shared = str(tmp_path / "scratch")
    process = start_trainer("train", "--model", "cnn", "--epochs", "1", "--output-dir", str(tmp_path / "x"),
                            "--run", "same", "--data-dir", data_dir, "--scratch-dir", shared)
    try:
        assert wait_until(lambda: os.path.exists(os.path.join(shared, "same", "checkpoints", "checkpoint")),
                          process=process)
        result = run_cli("train", "--model", "mlp300", "--epochs", "1", "--output-dir", str(tmp_path / "y"),
                         "--run", "same", "--data-dir", data_dir, "--scratch-dir", shared)
        assert result.returncode == 2
        assert error_lines(result.stderr) == [
            f"error: scratch folder {shared}/same is in use by another trainer (process {process.pid}); "
            "give this one another --scratch-dir"]
        assert os.path.exists(os.path.join(shared, "same", "checkpoints", "checkpoint"))  # not emptied
    finally:
        process.kill()
        process.wait()
    # Its holder gone, the folder is emptied and filled from the second run's own store: nothing of the cnn.
    run = open_for_training(dataclasses.replace(mlp, run=dataclasses.replace(mlp.run, scratch_dir=shared)))
    try:
        assert os.listdir(run.local.checkpoints) == []
    finally:
        run.close()


def test_a_checkpoint_of_another_model_is_a_config_error(data_dir, tmp_path):
    args = ["--output-dir", str(tmp_path), "--run", "r", "--data-dir", data_dir, "--epochs", "1"]
    assert run_cli("train", "--model", "mlp300", *args).returncode == 0
    os.remove(tmp_path / "r" / "config.json")  # nothing left to tell the settings apart but the checkpoint
    os.remove(tmp_path / "r" / "metrics.json")
    result = run_cli("train", "--model", "mlp3x256", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result.stderr)[0].startswith(f"error: checkpoint ckpt-600 of {tmp_path / 'r'} does not fit "
                                                    "this model"), result.stderr[-2000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB file system (tmpfs; needs root, as CI has): room for one small checkpoint, not two."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield str(folder)
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_scratch_disk_is_one_line_exit_74_and_the_store_stays_whole(small_disk, data_dir, tmp_path):
    args = ["train", "--model", "mlp300", "--epochs", "1", "--checkpoint-every", "100", "--output-dir",
            str(tmp_path / "runs"), "--run", "r", "--data-dir", data_dir]
    result = run_cli(*args, "--scratch-dir", small_disk)
    assert result.returncode == 74, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on the disk of {small_disk}/r/"), errors
    assert "Traceback" not in result.stderr
    store = LocalStore(str(tmp_path / "runs" / "r"))
    latest, kept = parse_pointer(store.read(POINTER))  # what was shipped before the disk filled is whole
    for name in kept:
        reader = tf.train.load_checkpoint(os.path.join(store.root, "checkpoints", name))
        assert reader.get_variable_to_shape_map()
    result = run_cli(*args, "--scratch-dir", str(tmp_path / "roomy"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from step {checkpoint_step(latest)} of 600" in result.stderr
