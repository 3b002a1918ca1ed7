"""SIGTERM to exit 75, per preset: how much of a GKE Spot pod's 15 s the save and ship take.

Each run trains a preset in a fresh process into gs:// (the GCS emulator on loopback) with the --grace-seconds
`submit --spot` gives the trainer, is sent SIGTERM a moment after its first logs reach the bucket, and counts only
if it exits 75 with the bucket's checkpoint pointer at the step it says it stopped at. Run with `make bench`
(`ONLY=sigterm`).
"""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import subprocess
import tempfile
import time
from typing import Any

from bench.common import ROOT, trainer_command
from tests.gcs import Emulator  # the same loopback emulator the tests use
from trainer.config import EXIT_INTERRUPTED, PRESETS
from trainer.launch.manifests import SPOT_GRACE_SECONDS, JobSpec, trainer_grace

GRACE = trainer_grace(JobSpec(run="r", image="i", output_dir="gs://b", spot=True))
EPOCHS = "5"  # every preset is still training when signalled
BUCKET = "bench-sigterm"


def _one(model: str, run: str, scratch: str, rng: random.Random) -> float:
    """Seconds from SIGTERM to exit 75 of one run, its checkpoint committed to the bucket."""
    from google.cloud import storage

    from trainer.run_dir import POINTER, checkpoint_step, parse_pointer

    command = trainer_command(f"gs://{BUCKET}/runs", run, scratch, "--model", model, "--epochs", EPOCHS,
                              "--grace-seconds", str(GRACE))
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    bucket = storage.Client().bucket(BUCKET)
    while not any(bucket.list_blobs(prefix=f"runs/{run}/logs/train/", max_results=1)):
        if process.poll() is not None:
            raise RuntimeError(f"{model} ended before training: {process.stderr.read()[-2000:]}")
        time.sleep(0.2)
    time.sleep(rng.uniform(0.0, 3.0))
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - signalled
    stopped = re.search(r"interrupted by SIGTERM at step (\d+); checkpoint shipped", stderr)
    pointer = bucket.blob(f"runs/{run}/{POINTER}").download_as_bytes()
    if process.returncode != EXIT_INTERRUPTED or not stopped or \
            checkpoint_step(parse_pointer(pointer)[0]) != int(stopped.group(1)):
        raise RuntimeError(f"{model}: exit {process.returncode}, pointer {pointer!r}: {stderr[-2000:]}")
    return seconds


def run(rounds: int = 5) -> dict[str, Any]:
    """`rounds` runs of every preset, interleaved; each one's seconds, median and max."""
    server = Emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = server.url  # this process's client and the trainers it starts
    from google.cloud import storage

    storage.Client().create_bucket(BUCKET)
    seconds: dict[str, list[float]] = {model: [] for model in PRESETS}
    rng = random.Random(0)
    try:
        with tempfile.TemporaryDirectory() as work:
            for i in range(rounds):
                for model in PRESETS:
                    run_name = f"{model.replace('_', '-')}-{i}"
                    seconds[model].append(round(_one(model, run_name, os.path.join(work, run_name), rng), 2))
    finally:
        server.stop()
        del os.environ["STORAGE_EMULATOR_HOST"]
    return {
        "workload": f"each preset, {EPOCHS} epochs, default intervals, --grace-seconds {GRACE}; SIGTERM 0-3 s after "
                    "its first logs reached gs:// (the GCS emulator on loopback)",
        "pod_grace_seconds": SPOT_GRACE_SECONDS,
        "grace_seconds": GRACE,
        "presets": {model: {"seconds": s, "median": round(statistics.median(s), 2), "max": max(s)}
                    for model, s in seconds.items()},
    }


def rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """This suite's lines of the `make bench` table."""
    return [(f"SIGTERM -> exit 75, {model}", f"median {p['median']:.1f} s, max {p['max']:.1f} s "
             f"(of {s['grace_seconds']} s)") for model, p in s["presets"].items()]


def table(s: dict[str, Any]) -> str:
    """The docs' table of this suite: one row per preset, the machine and date once."""
    lines = [f"Measured on {s['date'][:10]} ({s['cpu']}), {len(next(iter(s['presets'].values()))['seconds'])} runs per "
             "preset, against the GCS emulator on loopback (not real GCS).", "",
             f"| preset | SIGTERM to exit 75, median | max | the trainer's grace (`--spot`) |", "|---|---:|---:|---:|"]
    lines += [f"| `{model}` | {p['median']:.1f} s | {p['max']:.1f} s | {s['grace_seconds']} s |"
              for model, p in s["presets"].items()]
    return "\n".join(lines)
