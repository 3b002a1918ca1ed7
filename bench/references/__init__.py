"""Reference programs the benchmark suites run in fresh processes (`python -m bench.references.NAME`), and what
the time-to-accuracy ones share: the trainer's recipe they port, and the evaluation line the bench reads."""

from __future__ import annotations

import json
import time

from trainer.config import PRESETS, steps_per_epoch


def lenet_bn_recipe(num_examples: int) -> tuple[int, float, int, int]:
    """The trainer's lenet_bn preset for a peer: (batch, peak learning rate, steps of its one epoch, warm-up
    steps), the steps counted as the trainer counts them."""
    recipe = PRESETS["lenet_bn"]
    batch = recipe["batch_size"]
    steps = steps_per_epoch(num_examples, batch)
    return batch, recipe["learning_rate"], steps, round(recipe["warmup_epochs"] * steps)


def report_evaluation(epoch: int, test_accuracy: float) -> None:
    """Print one evaluation as the JSON line bench/time_to_accuracy.py reads, stamped with the wall time now."""
    print(json.dumps({"epoch": epoch, "test_accuracy": test_accuracy, "time": time.time()}), flush=True)
