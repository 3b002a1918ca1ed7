"""How cost grows on this machine: the cnn preset at one global batch as 1 process with 1 replica, 1 process with 2
logical CPU replicas (MirroredStrategy), and 2 worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy over
gRPC), examples/sec from each run's metrics.json (best and median of interleaved rounds); and one step's
all-reduce of every preset's gradients, timed alone (bench/references/allreduce.py) in the last two set-ups.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import ROOT, reference, reference_command, trainer_command

BATCH = 64  # global
ROUNDS = 3
CALLS = 200
PRESETS = ("mlp3x256", "cnn", "mlp300", "convnet_bn", "lenet_bn")

# On paper, for GPUs (not measurable here). A link: (bus bandwidth a ring all-reduce reaches, bytes/s; latency per
# ring step, s). Sources: NVIDIA's A100 datasheet (NVLink 3, 600 GB/s per GPU; NCCL's all-reduce bus bandwidth on 8
# such GPUs is commonly reported near 230 GB/s), the L4 datasheet (PCIe Gen4 x16, no NVLink: 32 GB/s per direction,
# taken as half of it on 8 GPUs sharing host bridges), Google Cloud's GPU machine types (up to 100 Gbps per VM on
# a2 and g2 machines); 25 Gbps is common Ethernet. NCCL over TCP is taken to reach 80% of line rate.
NVLINK, PCIE = (230e9, 5e-6), (16e9, 10e-6)
NET_100G, NET_25G = (0.8 * 100e9 / 8, 30e-6), (0.8 * 25e9 / 8, 30e-6)
SETUPS = {  # (GPUs per node, nodes, link inside a node, link between nodes)
    "8 A100, NVLink": (8, 1, NVLINK, None),
    "8 L4, PCIe": (8, 1, PCIE, None),
    "2 x 8 L4, 100 Gb/s": (8, 2, PCIE, NET_100G),
    "2 x 8 L4, 25 Gb/s": (8, 2, PCIE, NET_25G),
}
# A GPU step: a fixed cost (~50 kernel launches of ~8 us in a tf.function step) plus the FLOPs of forward and backward
# (3x the forward) at 25% of an L4's 30.3 TFLOP/s float32 peak (small MNIST layers keep a GPU far from its peak).
STEP_OVERHEAD = 0.4e-3
GPU_FLOPS = 0.25 * 30.3e12
EFFICIENCY = 0.75  # "still scaling": the all-reduce takes at most a quarter of a step
MAX_BATCH = 4096  # per replica; beyond it one step of 16 GPUs is more than an MNIST epoch


def _ring(replicas: int, size: float, link: tuple[float, float]) -> float:
    """Seconds of a ring all-reduce of `size` bytes over `replicas` on a link (bandwidth, latency per step)."""
    bandwidth, latency = link
    return 2 * (replicas - 1) / replicas * size / bandwidth + 2 * (replicas - 1) * latency


def all_reduce_seconds(size: float, gpus: int, nodes: int, inside: tuple, between: tuple | None) -> float:
    """Hierarchical all-reduce (what NCCL does across nodes): inside each node, then between nodes over their one
    network link, then back inside."""
    return _ring(gpus, size, inside) + (_ring(nodes, size, between) if nodes > 1 else 0.0)


def on_paper(bytes_per_step: dict[str, int], forward_flops: dict[str, int]) -> dict[str, Any]:
    """Per preset and set-up: the all-reduce's time, and the smallest per-replica batch (a power of two) at which a
    step still spends EFFICIENCY of its time computing (TensorFlow all-reduces after the backward pass), or None."""
    estimates: dict[str, Any] = {}
    for preset, size in bytes_per_step.items():
        per_image = 3 * forward_flops[preset] / GPU_FLOPS
        estimates[preset] = {}
        for name, setup in SETUPS.items():
            reduce = all_reduce_seconds(size, *setup)
            batch = next((b for b in (2 ** k for k in range(4, 13))
                          if STEP_OVERHEAD + b * per_image >= EFFICIENCY / (1 - EFFICIENCY) * reduce), None)
            estimates[preset][name] = {"all_reduce_ms": round(1000 * reduce, 3), "min_batch_per_replica": batch}
    return estimates


def _ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _group_env(index: int, ports: list[int]) -> dict[str, str]:
    """A worker's environment, as the JobSet gives it (TRAINER_WORKERS, JOB_COMPLETION_INDEX)."""
    return {**os.environ, "TRAINER_WORKERS": ",".join(f"127.0.0.1:{p}" for p in ports),
            "JOB_COMPLETION_INDEX": str(index)}


def _in_group(commands: list[list[str]]) -> list[str]:
    """Run one command per worker at once; each one's stdout."""
    ports = _ports(len(commands))
    processes = [subprocess.Popen(command, cwd=ROOT, env=_group_env(i, ports), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for i, command in enumerate(commands)]
    outputs = [p.communicate(timeout=1800)[0] for p in processes]
    for p in processes:
        if p.returncode:
            raise subprocess.CalledProcessError(p.returncode, commands[0])
    return outputs


def _trainer(work: str, run: str, setup: str) -> float:
    """Examples/sec of one cnn run (1 epoch) in a set-up: one, two_replicas or two_workers."""
    runs = os.path.join(work, "runs")
    flags = ("--model", "cnn", "--epochs", "1", "--batch-size", str(BATCH))
    if setup == "two_workers":
        _in_group([trainer_command(runs, run, os.path.join(work, f"scratch-{i}"), *flags) for i in range(2)])
    else:
        extra = ("--cpu-replicas", "2") if setup == "two_replicas" else ()
        subprocess.run(trainer_command(runs, run, os.path.join(work, "scratch"), *flags, *extra), cwd=ROOT,
                       check=True, capture_output=True)
    with open(os.path.join(runs, run, "metrics.json")) as f:
        return json.load(f)["examples_per_sec"]


def _all_reduce(preset: str, setup: str) -> dict[str, Any]:
    """One step's all-reduce of the preset's gradients, in 2 logical replicas or 2 worker processes."""
    if setup == "two_workers":
        outputs = _in_group([reference_command("allreduce", preset, str(CALLS)) for _ in range(2)])
        return json.loads(outputs[0].strip().splitlines()[-1])
    return json.loads(reference("allreduce", preset, str(CALLS), "2", onednn=True))


def run() -> dict[str, Any]:
    """Throughput of the three set-ups and all-reduce times of every preset."""
    started = time.time()
    setups = ("one", "two_replicas", "two_workers")
    with tempfile.TemporaryDirectory() as work:
        rounds = [{s: _trainer(work, f"{s}-{r}", s) for s in setups} for r in range(ROUNDS)]
    speeds = {s: [round(r[s], 1) for r in rounds] for s in setups}
    all_reduce = {setup: {preset: _all_reduce(preset, setup) for preset in PRESETS}
                  for setup in ("two_replicas", "two_workers")}
    flops = {p: json.loads(reference("model_flops", p))["forward_flops_per_image"] for p in PRESETS}
    return {
        "workload": f"cnn preset, MNIST, global batch {BATCH}, 1 epoch per run, {ROUNDS} interleaved rounds; "
                    f"all-reduce: mean of {CALLS} calls after warm-up, minus the same call without it",
        "examples_per_sec": {s: max(v) for s, v in speeds.items()},
        "median_examples_per_sec": {s: statistics.median(v) for s, v in speeds.items()},
        "rounds": speeds,
        "all_reduce": {setup: {p: {"bytes": r["bytes"], "ms": round(1000 * r["all_reduce_seconds"], 3),
                                   "step_ms_with": round(1000 * r["seconds_per_step"], 3)}
                               for p, r in results.items()} for setup, results in all_reduce.items()},
        # What the GPU estimates rest on: gradient bytes per all-reduce and forward FLOPs per image.
        "forward_flops_per_image": flops,
        "on_paper": on_paper({p: r["bytes"] for p, r in all_reduce["two_replicas"].items()}, flops),
        "python": sys.version.split()[0],
        "seconds": round(time.time() - started, 1),
    }


def rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    """This suite's lines of the `make bench` table."""
    e, m = t["examples_per_sec"], t["median_examples_per_sec"]
    lines = [(f"cnn, global batch {BATCH}: 1 process, 1 replica", f"{e['one']:.0f}/s (median {m['one']:.0f})")]
    for setup, label in (("two_replicas", "1 process, 2 logical replicas"), ("two_workers", "2 worker processes")):
        lines.append((f"  {label}", f"{e[setup]:.0f}/s (median {m[setup]:.0f}; {e[setup] / e['one']:.2f} x)"))
    for setup, results in t["all_reduce"].items():
        reduce = ", ".join(f"{p} {r['ms']:.2f} ms ({r['bytes'] / 1e6:.2f} MB)" for p, r in results.items())
        lines.append((f"  all-reduce per step, {setup.replace('_', ' ')}", reduce))
    for preset, links in t.get("on_paper", {}).items():
        lines.append((f"  on paper, {preset}: min batch per GPU", ", ".join(
            f"{link} {e['min_batch_per_replica'] or f'>{MAX_BATCH}'} ({e['all_reduce_ms']:.2f} ms)"
            for link, e in links.items())))
    return lines
