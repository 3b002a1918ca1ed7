"""Training throughput of the trainer against reference loops on the same model, data and batch.

References (bench/references/tf_loops.py): (a) the tutorial's loop as published (a GradientTape step in a
tf.function, Adam, tf.data shuffle + batch); (b) Keras `model.fit`. Peers (bench/peers.py): the same model,
Adam 1e-3 and batch in PyTorch (eager with channels-last and fused Adam, and with torch.compile) and in JAX
(one jitted step per call), each in its own virtual environment. Each runs in a fresh process;
examples/sec are counted after a warm-up. The references run with TensorFlow's default settings, as
published; Keras fit also runs with oneDNN on, the runtime setting the trainer's entry point makes.
Also measured: the trainer with 2 logical CPU replicas vs 1 at the same global batch, model FLOP/s
against this machine's float32 matmul peak, and the trainer's peak resident memory.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any

from bench import peers
from bench.common import mnist_data_dir, reference, trainer_command

BATCH = 64
WARMUP_STEPS = 30
TIMED_STEPS = 300
ROUNDS = 5
PEERS = {"pytorch": ("torch",), "pytorch_compile": ("torch", "--compile"), "jax": ("jax",)}


def _trainer(work: str, run: str, *flags: str) -> tuple[dict[str, Any], float]:
    """One trainer run; its metrics.json and its peak resident memory in MiB."""
    command = trainer_command(os.path.join(work, "runs"), run, os.path.join(work, "scratch"),
                              "--model", "cnn", "--epochs", "1", "--batch-size", str(BATCH), *flags)
    max_rss_kib = int(reference("max_rss", *command))
    with open(os.path.join(work, "runs", run, "metrics.json")) as f:
        return json.load(f), max_rss_kib / 1024


def _one_round(work: str, round_: int, data_dir: str) -> tuple[dict[str, float], float]:
    """Every contender once, in a fixed order; examples/sec by name and the trainer's peak RSS."""
    steps = (str(BATCH), str(WARMUP_STEPS), str(TIMED_STEPS))
    speeds = {name: peers.run(peer, "throughput", data_dir, *steps, *flags)["examples_per_sec"]
              for name, (peer, *flags) in PEERS.items()}
    speeds |= {
        "tutorial_loop": json.loads(reference("tf_loops", "tutorial", *steps))["examples_per_sec"],
        "keras_fit": json.loads(reference("tf_loops", "fit", *steps))["examples_per_sec"],
        # The trainer's entry point turns on oneDNN; fit with that runtime setting separates the two effects.
        "keras_fit_onednn": json.loads(reference("tf_loops", "fit", *steps, onednn=True))["examples_per_sec"],
    }
    one, rss = _trainer(work, f"one-replica-{round_}")
    two, _ = _trainer(work, f"two-replicas-{round_}", "--cpu-replicas", "2")
    speeds.update(trainer=one["examples_per_sec"], trainer_two_replicas=two["examples_per_sec"])
    return speeds, rss


def run() -> dict[str, Any]:
    """All throughput, efficiency, scaling and memory measurements, in one invocation."""
    started = time.time()
    # This machine is shared and noisy: interleaved rounds, and each contender's best round counts.
    data_dir = mnist_data_dir()
    for peer in {peer for peer, *_ in PEERS.values()}:
        peers.python(peer)  # made before the clock starts
    with tempfile.TemporaryDirectory() as work:
        rounds = [_one_round(work, r, data_dir) for r in range(ROUNDS)]
    runs = {name: [round(speeds[name], 1) for speeds, _ in rounds] for name in rounds[0][0]}
    best = {name: max(values) for name, values in runs.items()}
    median = {name: round(statistics.median(values), 1) for name, values in runs.items()}
    # The matmul peak is the better of TensorFlow's Eigen and oneDNN kernels.
    peak = max(json.loads(reference("matmul_peak", onednn=on))["peak_flops"] for on in (False, True))
    forward = json.loads(reference("model_flops"))["forward_flops_per_image"]
    train_flops = 3 * forward  # forward + backward (about twice the forward)
    trainer = best["trainer"]
    return {
        "workload": f"cnn preset, MNIST, batch {BATCH}; references timed over {TIMED_STEPS} steps after "
                    f"{WARMUP_STEPS}; the trainer over one epoch after its first call; best of {ROUNDS} "
                    f"interleaved rounds",
        "examples_per_sec": best,
        "median_examples_per_sec": median,
        "rounds": runs,
        # Per round, side by side: the ratio of the two medians is less sensitive to one lucky round.
        "trainer_over_peers": {name: round(trainer / best[name], 3) for name in PEERS},
        "trainer_over_peers_median": {name: round(median["trainer"] / median[name], 3) for name in PEERS},
        "trainer_over_tutorial_loop": round(trainer / best["tutorial_loop"], 3),
        "trainer_over_keras_fit": round(trainer / best["keras_fit"], 3),
        "trainer_over_keras_fit_onednn": round(trainer / best["keras_fit_onednn"], 3),
        "training_flops_per_image": train_flops,
        "achieved_gflops": round(train_flops * trainer / 1e9, 2),
        "peak_matmul_gflops": round(peak / 1e9, 2),
        "efficiency_percent": round(100 * train_flops * trainer / peak, 1),
        "two_replicas_over_one": round(best["trainer_two_replicas"] / trainer, 3),
        "peak_rss_mib": round(max(rss for _, rss in rounds), 1),
        "seconds": round(time.time() - started, 1),
    }


def rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    """This suite's lines of the `make bench` table."""
    e = t["examples_per_sec"]
    m = t.get("median_examples_per_sec", e)
    return [
        (f"trainer examples/sec (cnn, batch {BATCH})", f"{e['trainer']:.0f} (median {m['trainer']:.0f})"),
        *((f"  vs {name.replace('_', ' ')}", f"{ratio:.2f} x ({e[name]:.0f}/s; medians {m['trainer']:.0f} vs "
           f"{m[name]:.0f}: {t['trainer_over_peers_median'][name]:.2f} x)")
          for name, ratio in t.get("trainer_over_peers", {}).items()),
        ("  vs tutorial loop", f"{t['trainer_over_tutorial_loop']:.2f} x ({e['tutorial_loop']:.0f}/s)"),
        ("  vs Keras fit", f"{t['trainer_over_keras_fit']:.2f} x ({e['keras_fit']:.0f}/s)"),
        ("  vs Keras fit with oneDNN on",
         f"{t['trainer_over_keras_fit_onednn']:.2f} x ({e['keras_fit_onednn']:.0f}/s)"),
        ("model FLOP/s vs matmul peak", f"{t['efficiency_percent']}% ({t['achieved_gflops']} of "
                                        f"{t['peak_matmul_gflops']} GFLOP/s)"),
        ("2 CPU replicas vs 1, same global batch", f"{t['two_replicas_over_one']:.2f} x"),
        ("peak resident memory of a run", f"{t['peak_rss_mib']:.0f} MiB"),
    ]
