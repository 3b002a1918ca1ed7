"""One writer per run: conditional writes on a local folder and on a GCS server that enforces preconditions
(fake-gcs-server), racing processes, and real trainers that are refused, wait and take over, or lose the lease."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from google.cloud import storage

from conftest import ROOT, error_lines, run_cli, start_trainer, wait_until
from trainer.config import EXIT_INTERRUPTED, EXIT_LEASED, config_from_args
from trainer.lease import LEASE, Lease
from trainer.run_dir import ScratchLock, scratch_folder
from trainer.storage import Conflict, GCSStore, LocalStore

TRAIN = ["train", "--model", "mlp300", "--batch-size", "100", "--steps-per-loop", "20", "--data-source", "idx"]


@pytest.fixture(params=["local", "gcs"])
def versioned(request, tmp_path):
    """A store whose conditional writes are enforced by its backend: a local folder, or fake-gcs-server."""
    if request.param == "local":
        return {"url": str(tmp_path / "store"), "env": {}}
    name = request.getfixturevalue("concurrent_bucket")
    return {"url": f"gs://{name}/runs/r", "env": {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}}


def _open(url: str):
    return GCSStore(url) if url.startswith("gs://") else LocalStore(url)


def test_conditional_writes(versioned):
    store = _open(versioned["url"])
    assert store.read_versioned("x.json") == (None, 0) and store.generation("x.json") == 0
    first = store.write_if("x.json", b"one", 0)
    with pytest.raises(Conflict):
        store.write_if("x.json", b"again", 0)  # exists already
    assert store.read_versioned("x.json") == (b"one", first) == (store.read("x.json"), store.generation("x.json"))
    second = store.write_if("x.json", b"two", first)
    assert second != first
    with pytest.raises(Conflict):
        store.write_if("x.json", b"stale", first)  # someone wrote it since
    assert store.read_versioned("x.json") == (b"two", second)


_CLAIM = """
import json, sys, time
from trainer.lease import Lease, LeaseHeld
from trainer.storage import GCSStore, LocalStore
url, me, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = GCSStore(url) if url.startswith("gs://") else LocalStore(url)
time.sleep(max(0.0, start - time.time()))  # all claim at once
try:
    lease = Lease(store, 30.0, None, me, log=lambda line: None).acquire()
    print("acquired")
    time.sleep(3)  # hold it while the others try
    lease.release()
except LeaseHeld:
    print("refused")
"""


def test_racing_claims_give_the_lease_to_exactly_one(versioned):
    start = time.time() + 3
    claims = [subprocess.Popen([sys.executable, "-c", _CLAIM, versioned["url"], f"claim-{i}", str(start)], cwd=ROOT,
                               env={**os.environ, **versioned["env"]}, stdout=subprocess.PIPE, text=True)
              for i in range(6)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in claims)
    assert outcomes == ["acquired"] + ["refused"] * 5, outcomes
    record = json.loads(_open(versioned["url"]).read(LEASE))
    assert record["released"] is True  # given up at the end


def _lease(output: str, run: str) -> dict:
    return json.loads(_open(f"{output}/{run}").read(LEASE))


def test_a_second_trainer_is_refused_while_the_first_trains(data_dir, tmp_path):
    output = str(tmp_path / "runs")
    args = [*TRAIN, "--epochs", "2", "--output-dir", output, "--run", "r", "--data-dir", data_dir]
    first = start_trainer(*args, "--scratch-dir", str(tmp_path / "s1"))
    assert wait_until(lambda: os.path.exists(f"{output}/r/{LEASE}"), 120, first)
    second = start_trainer(*args, "--scratch-dir", str(tmp_path / "s2"))
    out, err = second.communicate(timeout=120)
    assert second.returncode == EXIT_LEASED and out == "", err
    assert re.fullmatch(rf"error: run {re.escape(output)}/r is being trained by \S+ pid {first.pid}; its lease runs "
                        r"until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in \d+ s\) unless renewed; wait for it to "
                        r"end, or give another --run\n", err), err
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert json.load(open(f"{output}/r/metrics.json"))["steps"] == 1200
    record = _lease(output, "r")
    assert record["released"] is True and record["holder"].endswith(f"pid {first.pid}")


def test_a_second_trainer_of_a_run_on_this_machine_is_refused_by_the_run_not_its_scratch(data_dir, tmp_path):
    """On one machine two trainers of one run share its default scratch folder, which the first locks before it
    takes the lease: the second is told of the run's trainer (exit 73), not sent to find another scratch folder."""
    output = str(tmp_path / "runs")
    args = [*TRAIN, "--output-dir", output, "--run", "r", "--data-dir", data_dir]
    lock = ScratchLock(scratch_folder(config_from_args({"output_dir": output, "run": "r"}),
                                      LocalStore(f"{output}/r").url))  # a trainer starting
    try:
        result = run_cli(*args)
        assert result.returncode == EXIT_LEASED and result.stdout == "", result.stderr[-2000:]
        assert error_lines(result.stderr) == [f"error: run {output}/r is in use by another trainer on this "
                                              f"machine (process {os.getpid()}); wait for it to end, or give another "
                                              "--run"]
        lease = Lease(LocalStore(f"{output}/r"), 30.0, None, lock.identity, log=lambda line: None).acquire()
        try:
            result = run_cli(*args)  # now the lease names it
            assert result.returncode == EXIT_LEASED, result.stderr[-2000:]
            assert re.fullmatch(rf"error: run {re.escape(output)}/r is being trained by \S+ pid {os.getpid()}; its "
                                r"lease runs until .* unless renewed; wait for it to end, or give another --run\n",
                                result.stderr), result.stderr
        finally:
            lease.release()
    finally:
        lock.release()
    assert [name for name in os.listdir(f"{output}/r") if not name.startswith(".")] == [LEASE]  # nothing else written


def test_a_rerun_on_this_machine_takes_over_from_a_killed_trainer_however_the_folder_is_spelled(data_dir, tmp_path):
    """The default scratch folder is the store's own (its absolute path), so a re-run that names the output dir
    relative to its working directory holds the dead trainer's scratch lock and takes the lease at once."""
    output = str(tmp_path / "runs")
    args = [*TRAIN, "--epochs", "1", "--run", "r", "--data-dir", data_dir]
    first = start_trainer(*args, "--output-dir", output, quiet=True)
    assert wait_until(lambda: os.path.exists(f"{output}/r/{LEASE}"), 120, first)
    first.kill()
    first.wait()
    assert _lease(output, "r")["released"] is False  # its lease is live for another minute
    result = run_cli(*args, "--output-dir", os.path.relpath(output, ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(f"{output}/r/metrics.json"))["steps"] == 600


def test_a_restarted_attempt_of_the_same_job_waits_for_a_dead_holder_and_takes_over(bucket, data_dir, tmp_path):
    output = f"gs://{bucket}/runs"
    job = {"TRAINER_JOB": "team/r"}  # as the manifests set it: the same in every attempt
    args = [*TRAIN, "--epochs", "2", "--output-dir", output, "--run", "r", "--data-dir", data_dir,
            "--checkpoint-every", "100", "--ship-every", "0.5", "--lease-seconds", "4"]
    first = start_trainer(*args, "--scratch-dir", str(tmp_path / "pod1"), env=job, quiet=True)
    pointer = storage.Client().bucket(bucket).blob("runs/r/checkpoints/checkpoint")
    assert wait_until(pointer.exists, 180, first), "no checkpoint was shipped"
    first.kill()  # kill -9: the lease stays, unreleased
    first.wait()
    assert _lease(output, "r")["released"] is False
    other = start_trainer(*args, "--scratch-dir", str(tmp_path / "pod2"))  # no job: refused while not expired
    assert other.wait(60) == EXIT_LEASED, other.communicate()[1]
    started = time.monotonic()
    second = start_trainer(*args, "--scratch-dir", str(tmp_path / "pod2"), env=job)  # a new pod, empty scratch
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    assert time.monotonic() - started >= 4  # it waited for the lease to expire
    lines, holder = err.splitlines(), f"{socket.gethostname()} pid {first.pid} (job team/r)"
    assert re.fullmatch(rf"run {output}/r: waiting for the lease of an earlier attempt of this job, "
                        rf"{re.escape(holder)}, to end; it expires by \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC", lines[0]), lines
    assert lines[1] == f"run {output}/r: took over the lease of {holder}, which stopped renewing it", lines
    metrics = json.loads(storage.Client().bucket(bucket).blob("runs/r/metrics.json").download_as_bytes())
    assert metrics["resumed_from_step"] > 0 and metrics["steps"] == 1200
    assert _lease(output, "r")["released"] is True


def test_a_holder_that_was_paused_past_its_lease_stops_writing_and_exits_75(concurrent_bucket, data_dir,
                                                                           tmp_path):
    bucket = concurrent_bucket  # frozen, the first trainer may be half-way through a request
    output = f"gs://{bucket}/runs"
    job = {"TRAINER_JOB": "team/r"}
    # Long enough that the first is frozen mid-run: at ~440 steps/s, 3 epochs (1,800 steps) were sometimes over
    # before the test saw the first checkpoint in the store.
    args = [*TRAIN, "--epochs", "8", "--output-dir", output, "--run", "r", "--data-dir", data_dir,
            "--checkpoint-every", "100", "--ship-every", "0.5", "--lease-seconds", "4"]
    first = start_trainer(*args, "--scratch-dir", str(tmp_path / "pod1"), env=job)
    pointer = storage.Client().bucket(bucket).blob("runs/r/checkpoints/checkpoint")
    assert wait_until(pointer.exists, 180, first), "no checkpoint was shipped"
    first.send_signal(signal.SIGSTOP)  # a node that froze or was partitioned: it neither renews nor exits
    second = start_trainer(*args, "--scratch-dir", str(tmp_path / "pod2"), env=job)
    try:
        assert wait_until(lambda: not _lease(output, "r")["holder"].endswith(f"pid {first.pid}"), 60, second)
        taken = _lease(output, "r")
        first.send_signal(signal.SIGCONT)  # back: it must notice before it writes anything
        out, err = first.communicate(timeout=120)
        assert first.returncode == EXIT_INTERRUPTED, err[-2000:]
        assert error_lines(err) == [f"error: run {output}/r: lost its lease to {taken['holder']} (job team/r) after "
                                    "4 s without renewing it (store unreachable, or this process paused); stopped "
                                    "writing; safe to retry"], err[-2000:]
        assert _lease(output, "r")["holder"] == taken["holder"]  # the lease was never written back
        out, err = second.communicate(timeout=600)
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    assert second.returncode == 0, err[-2000:]
    metrics = json.loads(storage.Client().bucket(bucket).blob("runs/r/metrics.json").download_as_bytes())
    assert metrics["steps"] == 4800 and metrics["resumed_from_step"] > 0
