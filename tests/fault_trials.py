"""Fault trials of one run to the emulated bucket: each attempt of the run is a real trainer process (a new pod:
empty scratch, the same TRAINER_JOB), killed with SIGKILL or stopped with SIGTERM at a moment chosen over its
whole life, until an attempt finishes. A watcher checks the bucket invariant (bucket_invariant.observe) all the
while; at the end the exported model is evaluated and must score what metrics.json says.

The attempt is frozen (SIGSTOP) before it is signalled, and its moment read from what it shows then: start-up
(nothing else yet), data (an IDX file of the data open), restore (the same as start-up, resuming a checkpoint:
lease, restore, TensorFlow start), mid-training (a step line), checkpoint shipping (a checkpoint saved in
scratch that the store's pointer does not name yet), final evaluation (after the last step's line), export
(after the last epoch's line, the model not yet in scratch), final flush (metrics.json written in scratch). The
exit code that moment calls for (`expected_exit`) is then exact: a SIGTERM stops the run with 75 at every
moment but the final flush, where the run is complete and exits 0, and before the entry point has taken the
signal (its handler, read from /proc while frozen), where the signal's own 143 ends a process that wrote
nothing."""

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
from conftest import ROOT, catches_sigterm, checkpoint_steps, process_state
from trainer.config import EXIT_INTERRUPTED
from trainer.lease import LEASE
from trainer.run_dir import METRICS, MODEL, MODEL_MARKERS, POINTER, parse_pointer, checkpoint_step
from trainer.storage import GCSStore

MOMENTS = ("start-up", "data", "restore", "mid-training", "checkpoint shipping", "final evaluation", "export",
           "final flush")
EPOCHS, BATCH, TOTAL = 2, 100, 1200  # mlp300: 600 steps an epoch at batch 100
CHECKPOINT_EVERY = 100
GRACE = 10.0
LEASE_SECONDS = 3.0
FAULTS_PER_TRIAL = 3
# After a moment's first sign, the signal comes within this many seconds (uniformly at random).
DELAYS = {"start-up": 3.0, "data": 0.0, "restore": 3.0, "mid-training": 1.0, "checkpoint shipping": 0.05,
          "final evaluation": 0.3, "export": 0.3, "final flush": 0.05}
KILLED, TERMINATED = 128 + signal.SIGKILL, 128 + signal.SIGTERM
# What an attempt's stderr shows (a progress line at least every --log-every): any step, the last step, the last
# epoch's evaluation.
STEP = re.compile(rf"^step (\d+)/{TOTAL} ", re.M)
LAST_STEP = re.compile(rf"^step {TOTAL}/{TOTAL} ", re.M)
LAST_EPOCH = re.compile(rf"^epoch {EPOCHS}/{EPOCHS}: ", re.M)


def expected_exit(kind: str, moment: str, handler: bool) -> int:
    """The exit code a signal of `kind` calls for at `moment`; `handler`: the trainer had taken SIGTERM."""
    if kind == "kill":
        return KILLED
    if not handler:
        return TERMINATED  # the entry point had not run: nothing was written, and nothing is lost
    return 0 if moment == "final flush" else EXIT_INTERRUPTED


@dataclasses.dataclass
class Fault:
    """One signal sent to one attempt."""

    target: str  # the moment aimed at
    moment: str  # the moment it came in (what the frozen attempt showed)
    kind: str  # "kill" (SIGKILL) or "sigterm"
    handler: bool  # the trainer had taken SIGTERM (its entry point had run)
    reached: int  # the last step the attempt had trained
    code: int  # how the attempt ended
    expected: int  # how that moment calls for it to end
    resumed: int = 0  # the step the next attempt went on from

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


def trainer_args(output_dir: str, run: str, data_dir: str) -> list[str]:
    """The trials' run: mlp300 for EPOCHS epochs, checkpointed, shipped and logged often."""
    return ["--model", "mlp300", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--steps-per-loop", "20",
            "--checkpoint-every", str(CHECKPOINT_EVERY), "--ship-every", "0.5", "--log-every", "0.1",
            "--grace-seconds", str(GRACE), "--lease-seconds", str(LEASE_SECONDS),
            "--output-dir", output_dir, "--run", run, "--data-dir", data_dir, "--data-source", "idx"]


class Attempt:
    """One trainer process of the run, its stderr in a file, its scratch folder its own."""

    def __init__(self, args: list[str], scratch: str, env: dict[str, str], run: str, data_dir: str) -> None:
        self.folder = os.path.join(scratch, run)  # the run's scratch copy
        self.data = os.path.join(os.path.realpath(data_dir), "")
        self.log = f"{scratch}.stderr"
        with open(self.log, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args, "--scratch-dir",
                                             scratch], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    def stderr(self) -> str:
        with open(self.log) as f:
            return f.read()

    def checkpoints(self) -> list[int]:
        """Steps of the checkpoints saved in scratch."""
        try:
            return checkpoint_steps(os.listdir(os.path.join(self.folder, "checkpoints")))
        except FileNotFoundError:
            return []

    def reading_data(self) -> bool:
        """True while the process has a file of the data folder open."""
        fds = f"/proc/{self.process.pid}/fd"
        try:
            names = os.listdir(fds)
        except OSError:
            return False
        for name in names:
            try:
                if os.readlink(os.path.join(fds, name)).startswith(self.data):
                    return True
            except OSError:
                pass
        return False

    def exported(self) -> bool:
        """True once the model is exported in scratch (the export writes beside it and swaps it in)."""
        return all(os.path.exists(os.path.join(self.folder, MODEL, m)) for m in MODEL_MARKERS)

    def freeze(self) -> bool:
        """SIGSTOP the process and wait until it is stopped; False if it had ended."""
        try:
            self.process.send_signal(signal.SIGSTOP)
            while True:
                state = process_state(self.process.pid)
                if state in "TZX":
                    return state == "T"
                time.sleep(0.0005)
        except (OSError, ProcessLookupError):
            return False

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


def _reached(stderr: str, start: int) -> int:
    steps = [int(s) for s in STEP.findall(stderr)]
    stopped = re.findall(r"interrupted by SIGTERM at step (\d+)", stderr)
    return max([start, *steps, *(int(s) for s in stopped)])


def moment(attempt: Attempt, store: GCSStore, restored: int) -> str | None:
    """The moment the frozen attempt is in, by what it shows; None between the export's end and metrics.json
    (the final check for SIGTERM may be behind it or not: no exit code is called for there)."""
    stderr = attempt.stderr()
    if os.path.exists(os.path.join(attempt.folder, METRICS)):
        return "final flush"
    if LAST_EPOCH.search(stderr):
        return None if attempt.exported() else "export"
    if LAST_STEP.search(stderr):
        return "final evaluation"
    saved = attempt.checkpoints()
    if saved and saved[-1] > shipped_step(store):
        return "checkpoint shipping"
    if STEP.search(stderr):
        return "mid-training"
    if attempt.reading_data():
        return "data"
    return "restore" if restored else "start-up"


def entered(target: str, attempt: Attempt, restored: int) -> bool:
    """True once the attempt shows the first sign of the `target` moment."""
    stderr = attempt.stderr()
    if target in ("start-up", "restore"):
        return True
    if target == "data":
        return attempt.reading_data()
    if target == "mid-training":
        return STEP.search(stderr) is not None
    if target == "checkpoint shipping":
        return any(step > restored for step in attempt.checkpoints())
    if target == "final evaluation":
        return LAST_STEP.search(stderr) is not None
    if target == "export":
        return LAST_EPOCH.search(stderr) is not None
    return os.path.exists(os.path.join(attempt.folder, METRICS))


def finished(store: GCSStore) -> bool:
    """True once the store holds the finished run's metrics."""
    return json.loads(store.read(METRICS) or b"{}").get("steps") == TOTAL


def shipped_step(store: GCSStore) -> int:
    """The step a new attempt resumes from: the store's latest checkpoint (all of them, once finished)."""
    if finished(store):
        return TOTAL
    pointer = store.read(POINTER)
    return checkpoint_step(parse_pointer(pointer)[0]) if pointer else 0


def possible(restored: int) -> list[str]:
    """The moments an attempt that resumes from step `restored` goes through."""
    if restored >= TOTAL:  # fully trained: restored, evaluated and exported, no training (and no step lines)
        return ["data", "restore", "export", "final flush"]
    return [m for m in MOMENTS if m != ("start-up" if restored else "restore")]


def run_trial(number: int, bucket: str, data_dir: str, workdir: str, rng: random.Random,
              covered: dict[str, int], required: str | None = None) -> Trial:
    """One run with FAULTS_PER_TRIAL faults at the least covered moments it can still reach (the first at
    `required`, until it is hit), then to the end."""
    run, url = f"t{number}", f"gs://{bucket}/trials/t{number}"
    args = trainer_args(f"gs://{bucket}/trials", run, data_dir)
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
            restored = shipped_step(store)
            if faults:
                faults[-1].resumed = restored
                if finished(store):
                    break  # the faulted attempt had finished the run
            attempt = Attempt(args, os.path.join(workdir, f"{run}-attempt{attempts}"), env, run, data_dir)
            missing = required is not None and all(f.moment != required for f in faults)
            if (len(faults) < FAULTS_PER_TRIAL or missing) and attempts <= 2 * FAULTS_PER_TRIAL + 2:
                options = possible(restored)
                if missing:  # a restore needs a checkpoint in the store: by the final evaluation there is one
                    target = required if required in options else "final evaluation"
                else:
                    least = min(covered.get(m, 0) for m in options)
                    target = rng.choice([m for m in options if covered.get(m, 0) == least])
                # Aimed at its required moment, the signal comes at its first sign (some moments are short).
                delay = 0.0 if missing else rng.uniform(0.0, DELAYS[target])
                fault = inject(attempt, target, rng.choice(("kill", "sigterm")), delay, store, restored)
                if fault is not None:
                    faults.append(fault)
                    covered[fault.moment] = covered.get(fault.moment, 0) + 1
                    if fault.code != fault.expected:
                        problems.append(f"attempt {attempts}: {fault.kind} at {fault.moment} (SIGTERM handler "
                                        f"{'taken' if fault.handler else 'not yet taken'}) ended with exit "
                                        f"{fault.code}, not {fault.expected}: {attempt.stderr()[-1500:]}")
                    continue
            code = attempt.process.wait(600)
            if code != 0:
                problems.append(f"attempt {attempts} without a fault ended with exit {code}: "
                                f"{attempt.stderr()[-1500:]}")
            break
    finally:
        stop.set()
        watcher.join(60)
    return Trial(number, faults, attempts, finished(store), evaluates_as_recorded(url, data_dir),
                 observations.count("checked"), violations, problems)


def evaluates_as_recorded(url: str, data_dir: str) -> bool:
    """True if the store at `url` holds a finished run whose exported model loads and scores what its
    metrics.json says."""
    store = GCSStore(url)
    if not finished(store):
        return False
    output_dir, run = url.rsplit("/", 1)
    evaluated = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--output-dir", output_dir, "--run", run,
                                "--data-dir", data_dir], cwd=ROOT, capture_output=True, text=True, timeout=300)
    recorded = json.loads(store.read(METRICS))["test_accuracy"]
    return evaluated.returncode == 0 and abs(json.loads(evaluated.stdout)["test_accuracy"] - recorded) < 1e-6


def inject(attempt: Attempt, target: str, kind: str, delay: float, store: GCSStore, restored: int) -> Fault | None:
    """Freeze the attempt `delay` seconds after it shows `target`, read its moment, send the signal (`kind`) and
    let it go on; how it ended. None if it ended first."""
    while True:
        while not entered(target, attempt, restored):
            if attempt.process.poll() is not None:
                return None  # it ended (finished, or failed: the caller reports that)
            time.sleep(0.001)
        time.sleep(delay)
        if not attempt.freeze():
            return None
        now = moment(attempt, store, restored)
        if now is not None:
            break
        attempt.thaw()  # between the export and metrics.json: wait for the final flush
        target, delay = "final flush", 0.0
    handler = catches_sigterm(attempt.process.pid)
    wrote = bool(attempt.stderr()) or f"pid {attempt.process.pid}\"" in (store.read(LEASE) or b"").decode()
    attempt.process.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
    attempt.thaw()
    signalled = time.monotonic()
    try:
        code = attempt.process.wait(GRACE + 15)
    except subprocess.TimeoutExpired:
        attempt.process.kill()
        code = attempt.process.wait()
    code = code if code >= 0 else 128 - code
    if kind == "sigterm" and time.monotonic() - signalled > GRACE + 2:
        code = -1  # not within the grace period: reported as a problem
    if code == TERMINATED and wrote:
        code = -2  # ended by the signal itself after its entry point had written something: a problem
    return Fault(target, now, kind, handler, _reached(attempt.stderr(), restored), code,
                 expected_exit(kind, now, handler))


def figure(trials: list[Trial]) -> dict[str, Any]:
    """The figure docs/reliability.md shows (make docs renders it from bench/faults.json)."""
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
