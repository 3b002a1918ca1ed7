"""Time to 99.0% MNIST test accuracy, from process start (imports included), in fresh processes.

The trainer runs its fastest preset (`lenet_bn`) through `python -m trainer train`, three times
(median); the moment is the wall time of its first test-accuracy TensorBoard event at or above the
target. The reference (bench/references/keras_io_convnet.py) is the keras.io MNIST convnet recipe as
published (Conv32-Pool-Conv64-Pool-Dropout-Dense softmax, Adam, batch 128, validation_split 0.1, up to
15 epochs, TensorFlow's default settings), fed the same MNIST arrays, with a callback that evaluates the
test set after each epoch and stops at the target.
Both clocks include their evaluations.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from bench.common import ROOT, reference_command, reference_env, trainer_command

TARGET = 0.99
PRESET = "lenet_bn"
TRAINER_RUNS = 3  # the machine is noisy: the median run counts (the recipe, ~6 minutes, runs once)



def _trainer(work: str, run: str) -> dict[str, Any]:
    """Run the preset once; seconds from process start to its first test accuracy >= TARGET."""
    command = trainer_command(os.path.join(work, "runs"), run, os.path.join(work, "scratch"), "--model", PRESET)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = time.time() - start
    (events,) = glob.glob(os.path.join(work, "runs", run, "logs", "test", "events.out.tfevents.*"))
    accumulator = event_accumulator.EventAccumulator(events, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    evaluations = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)), e.wall_time)
                   for e in accumulator.Tensors("accuracy")]
    with open(os.path.join(work, "runs", run, "metrics.json")) as f:
        metrics = json.load(f)
    return {
        "seconds_to_target": _first(((a, t - start) for _, a, t in evaluations)),
        "evaluations": [{"step": s, "test_accuracy": round(a, 4), "seconds": round(t - start, 1)}
                        for s, a, t in evaluations],
        "process_seconds": round(finished, 1),  # including the final export
        "final_test_accuracy": metrics["test_accuracy"],
    }


def _keras_io() -> dict[str, Any]:
    """Run the keras.io recipe once; seconds from process start to its first test accuracy >= TARGET."""
    env = reference_env()  # as published: TensorFlow's default settings
    start = time.time()
    result = subprocess.run(reference_command("keras_io_convnet", str(TARGET)), cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True)
    epochs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {
        "seconds_to_target": _first(((e["test_accuracy"], e["time"] - start) for e in epochs)),
        "evaluations": [{"epoch": e["epoch"], "test_accuracy": round(e["test_accuracy"], 4),
                         "seconds": round(e["time"] - start, 1)} for e in epochs],
    }


def _first(accuracy_seconds: Any) -> float | None:
    """Seconds of the first evaluation reaching TARGET, or None if none did."""
    return next((round(seconds, 1) for accuracy, seconds in accuracy_seconds if accuracy >= TARGET), None)


def run() -> dict[str, Any]:
    """Time to TARGET of the trainer's fastest preset (median of TRAINER_RUNS) and of the keras.io recipe."""
    with tempfile.TemporaryDirectory() as work:
        runs = [_trainer(work, f"tta-{i}") for i in range(TRAINER_RUNS)]
    reference = _keras_io()
    times = [r["seconds_to_target"] for r in runs]
    ours = None if None in times else statistics.median(times)
    theirs = reference["seconds_to_target"]
    return {
        "workload": f"MNIST to {TARGET:.1%} test accuracy; trainer preset {PRESET} vs the keras.io MNIST convnet "
                    f"recipe (model.fit, batch 128, <= 15 epochs); wall seconds from process start",
        "target": TARGET,
        "trainer": {"seconds_to_target": ours, "runs": runs},
        "keras_io_recipe": reference,
        "speedup": round(theirs / ours, 2) if ours and theirs else None,
    }


def rows(a: dict[str, Any]) -> list[tuple[str, str]]:
    """This suite's lines of the `make bench` table."""
    ours, theirs = a["trainer"]["seconds_to_target"], a["keras_io_recipe"]["seconds_to_target"]
    return [
        (f"seconds to {a['target']:.1%} test accuracy, trainer",
         f"{ours} s ({PRESET}, median of {TRAINER_RUNS}, from process start)"),
        ("  keras.io convnet recipe (fit)", f"{theirs} s ({a['speedup']} x slower)"),
    ]
