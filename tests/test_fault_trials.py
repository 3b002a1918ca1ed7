"""Fault trials over a run's whole life (tests/fault_trials.py): a few here; `make faults` runs 20 and writes
the figure the README quotes. RUN_FAULT_TRIALS=N sets the number, RUN_FAULT_SEED=S repeats a set,
FAULT_FIGURE=PATH writes the figure as JSON."""

from __future__ import annotations

import json
import os
import random

from fault_trials import CHECKPOINT_EVERY, MOMENTS, figure, run_trial

TRIALS = int(os.environ.get("RUN_FAULT_TRIALS", "2"))
SEED = int(os.environ["RUN_FAULT_SEED"])  # drawn in conftest.py unless given


def test_a_run_survives_kill_9_and_sigterm_at_every_moment_of_its_life(bucket, data_dir, tmp_path):
    rng, covered = random.Random(SEED), {}
    trials = [run_trial(n, bucket, data_dir, str(tmp_path), rng, covered) for n in range(TRIALS)]
    result = figure(trials)
    result["seed"] = SEED
    if os.environ.get("FAULT_FIGURE"):
        with open(os.environ["FAULT_FIGURE"], "w") as f:
            json.dump(result, f, indent=1)
    summary = {k: v for k, v in result.items() if k != "faults_detail"}
    print(json.dumps(summary, indent=1))
    context = f"seed {SEED}: {summary}"
    for trial in trials:
        assert not trial.problems, (context, trial.number, trial.problems)
        assert not trial.violations, (context, trial.number, trial.violations[:3])
        assert trial.finished and trial.evaluated_as_recorded, (context, trial.number)
    assert result["runs_lost"] == 0 and result["observations"] >= 10 * TRIALS, context
    # A kill loses the steps since the last committed checkpoint: at most --checkpoint-every plus those trained
    # while one commit is under way (100 steps take ~0.3 s here, about what a commit to the emulator takes).
    assert result["steps_lost_max"] <= 3 * CHECKPOINT_EVERY, (context, result["faults_detail"])
    assert result["steps_lost_sigterm"]["max"] == 0, (context, result["faults_detail"])  # it saves where it stops
    # An attempt may end before the moment aimed at comes (a short final flush), and a finished run takes no more.
    assert result["faults"] >= TRIALS, context
    if TRIALS >= 10:  # `make faults`: every moment of a run's life was hit
        assert all(result["moments"][m] for m in MOMENTS), context
