"""Shipping overhead: training examples/sec writing to gs:// (a GCS emulator on loopback) vs a local folder.

Both runs train the same model in fresh processes, alternating, and report the trainer's own
examples_per_sec (training steps only, after the first traced call). Run with `make bench`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from bench.common import ROOT, trainer_command
from tests.gcs import Emulator  # the same loopback emulator the tests use

TRAIN = ["--model", "cnn", "--epochs", "1"]  # default checkpoint and shipping intervals


def _train(output_dir: str, run: str, work: str, env: dict[str, str]) -> float:
    command = trainer_command(output_dir, run, os.path.join(work, "scratch"), *TRAIN)
    subprocess.run(command, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if output_dir.startswith("gs://"):
        path = os.path.join(work, "scratch", run, "metrics.json")
    else:
        path = os.path.join(output_dir, run, "metrics.json")
    with open(path) as f:
        return float(json.load(f)["examples_per_sec"])


def run(rounds: int = 3) -> dict[str, Any]:
    """Alternate local and gs:// runs; return medians and the relative overhead."""
    server = Emulator()
    env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url}
    subprocess.run([sys.executable, "-c", "from google.cloud import storage; storage.Client().create_bucket('bench')"],
                   env=env, check=True)
    local, gcs = [], []
    try:
        with tempfile.TemporaryDirectory() as work:
            for i in range(rounds):
                local.append(_train(os.path.join(work, "runs"), f"local{i}", work, env))
                gcs.append(_train("gs://bench/runs", f"gcs{i}", work, env))
    finally:
        server.stop()
    local_median, gcs_median = statistics.median(local), statistics.median(gcs)
    return {
        "workload": "cnn, 1 epoch of MNIST, batch 64, default checkpoint (500 steps) and shipping (10 s) intervals",
        "local_examples_per_sec": local,
        "gcs_examples_per_sec": gcs,
        "gcs_over_local": round(gcs_median / local_median, 3),
        "overhead_percent": round(100 * (1 - gcs_median / local_median), 1),
    }


def rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """This suite's line of the `make bench` table."""
    return [("gs:// (emulator) vs local, examples/sec",
             f"{s['gcs_over_local']:.3f} x ({s['overhead_percent']}% overhead)")]
