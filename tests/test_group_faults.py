"""Fault trials: worker groups of 2 and 3 real trainer processes on 127.0.0.1 with the manifests' environment
and a gs:// store (fake-gcs-server, which serves requests concurrently), driven by a stand-in for the JobSet
controller (tests/group.py) that applies the JobSet's own failure policy. Each trial kills (-9), freezes
(SIGSTOP: sockets stay open, no TCP reset, as a partitioned node) or stops (SIGTERM) a random worker at a random
moment while the group trains.

FAULT_TRIALS=N runs more trials (default 5), FAULT_SEED=S repeats a set."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
from google.cloud import storage

from conftest import error_lines, run_cli, wait_until
from group import Group
from trainer.cli import PEER_LOST_HOLD
from trainer.config import EXIT_INTERRUPTED, EXIT_PEER_LOST

TRIALS = int(os.environ.get("FAULT_TRIALS", "5"))
SEED = int(os.environ["FAULT_SEED"])  # drawn in conftest.py unless given
PEER_TIMEOUT = 10.0
GRACE = 10.0
# A survivor notices within --peer-timeout, the chief commits its saved checkpoint within --grace-seconds,
# every survivor holds its exit for PEER_LOST_HOLD; the rest is slack for a loaded 2-core machine.
BOUND = PEER_TIMEOUT + GRACE + PEER_LOST_HOLD + 15.0
BATCH, EPOCHS = 240, 3  # 250 steps per epoch, divisible by 2 and 3 workers
SIGNALS = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "sigterm": signal.SIGTERM}


def _trials() -> list[tuple[int, int, str, int]]:
    """(trial, workers, fault, victim): every group size with kill and freeze, then random ones (seeded)."""
    rng = random.Random(SEED)
    kinds = [(2, "kill"), (3, "freeze"), (3, "kill"), (2, "freeze"), (2, "sigterm")]
    kinds += [(rng.choice((2, 3)), rng.choice(("kill", "freeze", "sigterm"))) for _ in range(TRIALS - len(kinds))]
    return [(n, w, fault, rng.randrange(w)) for n, (w, fault) in enumerate(kinds[:TRIALS])]


def _wait_for_checkpoint(blob: storage.Blob, group: Group, timeout: float = 180) -> None:
    shipped = wait_until(lambda: blob.exists() or len(group.alive()) < group.workers, timeout)
    assert shipped and len(group.alive()) == group.workers, "no checkpoint was shipped"


@pytest.mark.parametrize("trial, workers, fault, victim", _trials(),
                         ids=lambda v: str(v) if not isinstance(v, str) else v)
def test_a_group_survives_a_lost_worker(trial, workers, fault, victim, concurrent_bucket, data_dir, tmp_path):
    bucket = concurrent_bucket  # some trials freeze the chief, possibly half-way through a request
    rng = random.Random(SEED * 100 + trial)
    run = f"trial{trial}"
    output = f"gs://{bucket}/runs"
    args = ["--model", "mlp300", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--steps-per-loop", "25",
            "--checkpoint-every", "50", "--ship-every", "1", "--output-dir", output, "--run", run,
            "--data-dir", data_dir, "--data-source", "idx", "--peer-timeout", str(PEER_TIMEOUT),
            "--startup-timeout", "120", "--grace-seconds", str(GRACE), "--lease-seconds", "6"]
    group = Group(workers, args, str(tmp_path / "pods"), env={})
    pointer = storage.Client().bucket(bucket).blob(f"runs/{run}/checkpoints/checkpoint")
    faulted: dict[str, float] = {}

    def inject(g: Group) -> None:
        _wait_for_checkpoint(pointer, g)  # training is under way
        time.sleep(rng.uniform(0.0, 4.0))  # a random moment while it trains
        assert len(g.alive()) == workers, "the group finished before the fault; make the trial longer"
        faulted["at"] = time.monotonic() - g.started
        g.signal(victim, SIGNALS[fault])

    final = group.run(timeout=900, first=inject)
    context = f"seed {SEED}, trial {trial}: {workers} workers, {fault} worker {victim}"
    first = group.attempts[0]
    survivors = [e for e in first.exits if e.index != victim]
    for survivor in survivors:
        lines = error_lines(survivor.stderr)
        if fault == "sigterm":  # every worker stops at the same step, after saving
            assert survivor.code == EXIT_INTERRUPTED, (context, survivor.stderr[-2000:])
            continue
        assert survivor.code == EXIT_PEER_LOST, (context, survivor.stderr[-2000:])
        assert survivor.seconds - faulted["at"] < BOUND, (context, survivor.seconds - faulted["at"])
        assert len(lines) == 1 and lines[0] == survivor.stderr.rstrip().splitlines()[-1], (context, lines)
        assert f"lost worker {victim} (127.0.0.1:" in lines[0], (context, survivor.index, survivor.stderr[-4000:])
    expected_action = {"kill": "RestartJobSet", "freeze": "RestartJobSetAndIgnoreMaxRestarts",
                       "sigterm": "RestartJobSetAndIgnoreMaxRestarts"}[fault]
    assert first.action == expected_action, (context, [(e.index, e.code) for e in first.exits])
    assert final == "Succeeded" and len(group.attempts) == 2, (context, [a.action for a in group.attempts])
    assert all(e.code == 0 for e in group.attempts[1].exits), context

    metrics = json.loads(storage.Client().bucket(bucket).blob(f"runs/{run}/metrics.json").download_as_bytes())
    lease = json.loads(storage.Client().bucket(bucket).blob(f"runs/{run}/lease.json").download_as_bytes())
    assert lease["job"] == "default/trial" and lease["released"], (context, lease)  # worker 0's, given up
    assert metrics["steps"] == EPOCHS * 60000 // BATCH and metrics["replicas"] == workers, context
    assert metrics["resumed_from_step"] > 0, context  # the restarted group went on from the store's checkpoint
    assert metrics["test_accuracy"] > 0.9, context
    evaluated = run_cli("evaluate", "--output-dir", output, "--run", run, "--data-dir", data_dir,
                        env={"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]})
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_a_worker_whose_peers_never_come_waits_a_bounded_time(bucket, data_dir, tmp_path):
    group = Group(3, ["--model", "mlp300", "--epochs", "1", "--batch-size", "240", "--output-dir",
                      f"gs://{bucket}/runs", "--run", "alone", "--data-dir", data_dir, "--startup-timeout", "15"],
                  str(tmp_path / "pods"), env={})
    group.start()
    group.signal(2, signal.SIGKILL)  # workers 0 (which hosts the coordination service) and 1 start; 2 never does
    attempt = group.wait_attempt(timeout=120)
    for worker in attempt.exits[:2]:
        assert worker.code == EXIT_PEER_LOST and worker.seconds < 15 + 30, (worker.code, worker.seconds)
        assert error_lines(worker.stderr) == [
            f"error: worker {worker.index}: not every worker joined within --startup-timeout 15 s; "
            "the group must restart"], worker.stderr[-2000:]
