"""Fault trials of one run to the emulated bucket: each attempt of the run is a real trainer process (a new pod:
empty scratch, the same TRAINER_JOB), killed with SIGKILL or stopped with SIGTERM at a moment chosen over its
whole life, until an attempt finishes. A watcher checks the bucket invariant (bucket_invariant.observe) all the
while; at the end the exported model is evaluated and must score what metrics.json says.

Moments, by what the attempt shows when the signal is sent (its stderr is a log file, a line every chunk):
start-up (nothing trained yet, nothing to restore), restore (the same, resuming a checkpoint: lease, restore,
TensorFlow start), mid-training, checkpoint shipping (a checkpoint saved in scratch that the store's pointer
does not name yet), final evaluation (after the last step's line), export (after the last epoch's line),
final flush (metrics.json written in scratch)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bucket_invariant import observe
from conftest import ROOT, checkpoint_steps
from trainer.config import EXIT_INTERRUPTED
from trainer.lease import LEASE
from trainer.run_dir import METRICS, POINTER, parse_pointer, checkpoint_step
from trainer.storage import GCSStore

MOMENTS = ("start-up", "restore", "mid-training", "checkpoint shipping", "final evaluation", "export",
           "final flush")
EPOCHS, BATCH, TOTAL = 2, 100, 1200  # mlp300: 600 steps an epoch at batch 100
CHECKPOINT_EVERY = 100
GRACE = 10.0
LEASE_SECONDS = 3.0
FAULTS_PER_TRIAL = 3
# After a moment's first sign, the signal comes within this many seconds (uniformly at random).
DELAYS = {"start-up": 3.0, "restore": 3.0, "mid-training": 1.0, "checkpoint shipping": 0.05,
          "final evaluation": 0.3, "export": 0.3, "final flush": 0.05}


@dataclasses.dataclass
class Fault:
    """One signal sent to one attempt."""

    target: str  # the moment aimed at
    moment: str  # the moment it came in (what the attempt showed)
    kind: str  # "kill" (SIGKILL) or "sigterm"
    reached: int  # the last step the attempt had trained
    code: int  # how the attempt ended
    resumed: int = 0  # the step the next attempt went on from
    # SIGTERM before the trainer's first line ran (the interpreter's own start, 20-50 ms): the signal's own exit,
    # 143; the attempt had printed and written nothing (on Kubernetes a preemption's DisruptionTarget is not counted).
    too_early: bool = False

    @property
    def lost(self) -> int:
        """Steps trained by the faulted attempt that the next one trained again."""
        return max(0, self.reached - self.resumed)


@dataclasses.dataclass
class Trial:
    """One run through its faults to the end."""

    number: int
    faults: list[Fault]
    attempts: int
    finished: bool
    evaluated_as_recorded: bool
    observations: int
    violations: list[str]
    problems: list[str]


class _Attempt:
    """One trainer process of the run, its stderr in a file, its scratch folder its own."""

    def __init__(self, args: list[str], scratch: str, env: dict[str, str], run: str) -> None:
        self.folder = os.path.join(scratch, run)  # the run's scratch copy
        self.log = f"{scratch}.stderr"
        with open(self.log, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args, "--scratch-dir",
                                             scratch], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        self.started = time.monotonic()

    def stderr(self) -> str:
        with open(self.log) as f:
            return f.read()

    def checkpoints(self) -> list[int]:
        """Steps of the checkpoints saved in scratch."""
        try:
            return checkpoint_steps(os.listdir(os.path.join(self.folder, "checkpoints")))
        except FileNotFoundError:
            return []


def _reached(stderr: str, start: int) -> int:
    steps = [int(s) for s in re.findall(rf"^step (\d+)/{TOTAL} ", stderr, re.M)]
    stopped = re.findall(r"interrupted by SIGTERM at step (\d+)", stderr)
    return max([start, *steps, *(int(s) for s in stopped)])


def _moment(attempt: _Attempt, store: GCSStore, had_checkpoint: bool) -> str:
    """The moment the attempt is in now, by what it shows."""
    stderr = attempt.stderr()
    if os.path.exists(os.path.join(attempt.folder, METRICS)):
        return "final flush"
    if re.search(rf"^epoch {EPOCHS}/{EPOCHS}: ", stderr, re.M):
        return "export"
    if re.search(rf"^step {TOTAL}/{TOTAL} ", stderr, re.M):
        return "final evaluation"
    saved = attempt.checkpoints()
    if saved and saved[-1] > _shipped_step(store):
        return "checkpoint shipping"
    if re.search(rf"^step \d+/{TOTAL} ", stderr, re.M):
        return "mid-training"
    return "restore" if had_checkpoint else "start-up"


def _entered(target: str, attempt: _Attempt, restored: int) -> bool:
    """True once the attempt shows the first sign of the `target` moment."""
    stderr = attempt.stderr()
    if target in ("start-up", "restore"):
        return True
    if target == "mid-training":
        return re.search(rf"^step \d+/{TOTAL} ", stderr, re.M) is not None
    if target == "checkpoint shipping":
        return any(step > restored for step in attempt.checkpoints())
    if target == "final evaluation":
        return re.search(rf"^step {TOTAL}/{TOTAL} ", stderr, re.M) is not None
    if target == "export":
        return re.search(rf"^epoch {EPOCHS}/{EPOCHS}: ", stderr, re.M) is not None
    return os.path.exists(os.path.join(attempt.folder, METRICS))


def _finished(store: GCSStore) -> bool:
    return json.loads(store.read(METRICS) or b"{}").get("steps") == TOTAL


def _shipped_step(store: GCSStore) -> int:
    """The step a new attempt resumes from: the store's latest checkpoint (all of them, once finished)."""
    if _finished(store):
        return TOTAL
    pointer = store.read(POINTER)
    return checkpoint_step(parse_pointer(pointer)[0]) if pointer else 0


def _possible(restored: int) -> list[str]:
    """The moments an attempt that resumes from step `restored` goes through."""
    if restored >= TOTAL:  # fully trained: restored, evaluated and exported, no training (and no step lines)
        return ["restore", "export", "final flush"]
    return [m for m in MOMENTS if m != ("start-up" if restored else "restore")]


def run_trial(number: int, bucket: str, data_dir: str, workdir: str, rng: random.Random,
              covered: dict[str, int]) -> Trial:
    """One run with FAULTS_PER_TRIAL faults at the least covered moments it can still reach, then to the end."""
    run, url = f"t{number}", f"gs://{bucket}/trials/t{number}"
    args = ["--model", "mlp300", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--steps-per-loop", "20",
            "--checkpoint-every", str(CHECKPOINT_EVERY), "--ship-every", "0.5", "--log-every", "0.1",
            "--grace-seconds", str(GRACE), "--lease-seconds", str(LEASE_SECONDS),
            "--output-dir", f"gs://{bucket}/trials", "--run", run, "--data-dir", data_dir, "--data-source", "idx"]
    env = {**os.environ, "TRAINER_JOB": f"trials/{run}"}
    store = GCSStore(url)
    observations, violations, stop = [], [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                observations.append(observe(url, os.path.join(workdir, f"observation-{run}")))
            except AssertionError as violation:
                violations.append(str(violation))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    faults: list[Fault] = []
    problems: list[str] = []
    attempts = 0
    try:
        while True:
            attempts += 1
            restored = _shipped_step(store)
            if faults:
                faults[-1].resumed = restored
                if _finished(store):
                    break  # the faulted attempt had finished the run
            attempt = _Attempt(args, os.path.join(workdir, f"{run}-attempt{attempts}"), env, run)
            if len(faults) < FAULTS_PER_TRIAL and attempts <= 2 * FAULTS_PER_TRIAL:
                options = _possible(restored)
                least = min(covered.get(m, 0) for m in options)
                target = rng.choice([m for m in options if covered.get(m, 0) == least])
                fault = _inject(attempt, target, rng, store, restored)
                if fault is not None:
                    faults.append(fault)
                    covered[fault.moment] = covered.get(fault.moment, 0) + 1
                    if fault.code not in (EXIT_INTERRUPTED, 0, 128 + signal.SIGKILL) and not fault.too_early:
                        problems.append(f"attempt {attempts}: {fault.kind} at {fault.moment} ended with exit "
                                        f"{fault.code}: {attempt.stderr()[-1500:]}")
                    continue
            code = attempt.process.wait(600)
            if code != 0:
                problems.append(f"attempt {attempts} without a fault ended with exit {code}: "
                                f"{attempt.stderr()[-1500:]}")
            break
    finally:
        stop.set()
        watcher.join(60)
    metrics = json.loads(store.read(METRICS) or b"{}")
    finished = _finished(store)
    evaluated = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--output-dir",
                                f"gs://{bucket}/trials", "--run", run, "--data-dir", data_dir], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    as_recorded = evaluated.returncode == 0 and finished and \
        abs(json.loads(evaluated.stdout)["test_accuracy"] - metrics["test_accuracy"]) < 1e-6
    return Trial(number, faults, attempts, finished, as_recorded, observations.count("checked"), violations,
                 problems)


def _inject(attempt: _Attempt, target: str, rng: random.Random, store: GCSStore, restored: int) -> Fault | None:
    """Signal the attempt soon after it shows `target`; None if it ended first without finishing the fault."""
    while not _entered(target, attempt, restored):
        if attempt.process.poll() is not None:
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, DELAYS[target]))
    kind = rng.choice(("kill", "sigterm"))
    if attempt.process.poll() is not None:
        return None  # it ended (finished, or failed: the caller reports that)
    moment = _moment(attempt, store, restored > 0)
    untouched = not attempt.stderr() and f"pid {attempt.process.pid}\"" not in (store.read(LEASE) or b"").decode()
    attempt.process.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
    signalled = time.monotonic()
    try:
        code = attempt.process.wait(GRACE + 15)
    except subprocess.TimeoutExpired:
        attempt.process.kill()
        code = attempt.process.wait()
    code = code if code >= 0 else 128 - code
    fault = Fault(target, moment, kind, _reached(attempt.stderr(), restored), code)
    fault.too_early = kind == "sigterm" and code == 128 + signal.SIGTERM and untouched and not attempt.stderr()
    if kind == "sigterm" and time.monotonic() - signalled > GRACE + 2:
        fault.code = -1  # not within the grace period: reported as a problem
    return fault


def figure(trials: list[Trial]) -> dict[str, Any]:
    """The numbers the README states."""
    faults = [f for t in trials for f in t.faults]
    lost = {kind: [f.lost for f in faults if f.kind == kind] or [0] for kind in ("kill", "sigterm")}
    return {
        "trials": len(trials),
        "faults": len(faults),
        "kill": sum(f.kind == "kill" for f in faults),
        "sigterm": sum(f.kind == "sigterm" for f in faults),
        "moments": {m: sum(f.moment == m for f in faults) for m in MOMENTS},
        "runs_lost": sum(not (t.finished and t.evaluated_as_recorded) for t in trials),
        "violations": sum(len(t.violations) for t in trials),
        "observations": sum(t.observations for t in trials),
        "steps_lost_max": max(lost["kill"] + lost["sigterm"]),
        "steps_lost_kill": {"median": statistics.median(lost["kill"]), "max": max(lost["kill"])},
        "steps_lost_sigterm": {"median": statistics.median(lost["sigterm"]), "max": max(lost["sigterm"])},
        "checkpoint_every": CHECKPOINT_EVERY,
        "faults_detail": [dataclasses.asdict(f) | {"trial": t.number, "lost": f.lost} for t in trials
                          for f in t.faults],
    }
