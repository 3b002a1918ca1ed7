"""`make bench`: run the benchmarks, print a table and write bench/results.json.

All comparisons run on this machine in this one invocation and are reported as ratios.
`make bench ONLY=storage_overhead` (or throughput, time_to_accuracy) runs one suite.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import storage_overhead  # noqa: E402
import throughput  # noqa: E402
import time_to_accuracy  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
SUITES = {"throughput": throughput.run, "time_to_accuracy": time_to_accuracy.run,
          "storage_overhead": storage_overhead.run}


def _table(results: dict) -> list[tuple[str, str]]:
    rows = []
    if "throughput" in results:
        t = results["throughput"]
        e = t["examples_per_sec"]
        rows += [
            (f"trainer examples/sec (cnn, batch {throughput.BATCH})", f"{e['trainer']:.0f}"),
            ("  vs tutorial loop", f"{t['trainer_over_tutorial_loop']:.2f} x ({e['tutorial_loop']:.0f}/s)"),
            ("  vs Keras fit", f"{t['trainer_over_keras_fit']:.2f} x ({e['keras_fit']:.0f}/s)"),
            ("  vs Keras fit with oneDNN on", f"{t['trainer_over_keras_fit_onednn']:.2f} x "
                                              f"({e['keras_fit_onednn']:.0f}/s)"),
            ("model FLOP/s vs matmul peak", f"{t['efficiency_percent']}% ({t['achieved_gflops']} of "
                                            f"{t['peak_matmul_gflops']} GFLOP/s)"),
            ("2 CPU replicas vs 1, same global batch", f"{t['two_replicas_over_one']:.2f} x"),
            ("peak resident memory of a run", f"{t['peak_rss_mib']:.0f} MiB"),
        ]
    if "time_to_accuracy" in results:
        a = results["time_to_accuracy"]
        ours, theirs = a["trainer"]["seconds_to_target"], a["keras_io_recipe"]["seconds_to_target"]
        rows += [
            (f"seconds to {a['target']:.1%} test accuracy, trainer",
             f"{ours} s ({time_to_accuracy.PRESET}, median of {time_to_accuracy.TRAINER_RUNS}, from process start)"),
            ("  keras.io convnet recipe (fit)", f"{theirs} s ({a['speedup']} x slower)"),
        ]
    if "storage_overhead" in results:
        s = results["storage_overhead"]
        rows.append(("gs:// (emulator) vs local, examples/sec", f"{s['gcs_over_local']:.3f} x "
                                                                f"({s['overhead_percent']}% overhead)"))
    return rows


def main() -> int:
    """Run the chosen benchmarks; merge into results.json; print the table."""
    only = os.environ.get("ONLY", "")
    results = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            results = json.load(f)
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}
    for name, suite in SUITES.items():
        if not only or name == only:
            results[name] = {**suite(), "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    for label, value in _table(results):
        print(f"{label:<44}{value}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
