"""Fault trials over a run's whole life (tests/fault_trials.py): two here, whose first faults aim at two moments
that rotate with the seed, so that consecutive runs of the suite come to every moment (the seed counts this
machine's runs: see conftest.py; it is printed at the end). `make faults` runs 20 and writes the figure the docs
show. RUN_FAULT_TRIALS=N sets the number, RUN_FAULT_SEED=S repeats a set, FAULT_FIGURE=PATH writes the figure
as JSON."""

from __future__ import annotations

import datetime
import json
import os
import random

from bench.common import cpu_model
from fault_trials import CHECKPOINT_EVERY, MOMENTS, figure, run_trial

TRIALS = int(os.environ.get("RUN_FAULT_TRIALS", "2"))
SEED = int(os.environ["RUN_FAULT_SEED"])


def rotation(seed: int, trials: int) -> list[str]:
    """The moment each trial's first fault aims at: consecutive seeds go round MOMENTS, `trials` at a time."""
    return [MOMENTS[(seed * trials + n) % len(MOMENTS)] for n in range(trials)]


def test_a_run_survives_kill_9_and_sigterm_at_the_moments_its_seed_picks_and_every_moment_over_10_trials(
        concurrent_bucket, data_dir, tmp_path, record_property):
    # fake-gcs-server: an attempt is frozen, maybe half-way through a request, while the trial reads the store.
    bucket, rng, covered = concurrent_bucket, random.Random(SEED), {}
    required = rotation(SEED, TRIALS)
    record_property("fault trials", f"seed {SEED}: aimed at {' and '.join(required[:2])}"
                                    f"{' and more' if TRIALS > 2 else ''} (RUN_FAULT_SEED={SEED} repeats them)")
    trials = [run_trial(n, bucket, data_dir, str(tmp_path), rng, covered, required[n]) for n in range(TRIALS)]
    result = figure(trials)
    result |= {"seed": SEED, "date": datetime.date.today().isoformat(), "cpu": cpu_model()}  # docs/reliability.md
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
        # Each trial came to the moment it aimed at first (trying again in its next attempts if it missed).
        assert required[trial.number] in [f.moment for f in trial.faults], (context, trial.number, trial.faults)
    assert result["runs_lost"] == 0 and result["observations"] >= 10 * TRIALS, context
    # A kill loses the steps since the last committed checkpoint: at most --checkpoint-every plus those trained
    # while one commit is under way (100 steps take ~0.3 s here, about what a commit to the emulator takes).
    assert result["steps_lost_max"] <= 3 * CHECKPOINT_EVERY, (context, result["faults_detail"])
    assert result["steps_lost_sigterm"]["max"] == 0, (context, result["faults_detail"])  # it saves where it stops
    if TRIALS >= 10:  # `make faults`: every moment of a run's life was hit
        assert all(result["moments"][m] for m in MOMENTS), context


def test_consecutive_seeds_aim_the_two_trials_of_make_test_at_every_moment_in_turn():
    aimed = [rotation(seed, 2) for seed in range(1000, 1000 + len(MOMENTS) // 2)]
    assert all(len(set(pair)) == 2 for pair in aimed)
    assert sorted(m for pair in aimed for m in pair) == sorted(MOMENTS)
