"""`make bench` (`python -m bench.run`): run the benchmarks, print a table and write bench/results.json.

All comparisons run on this machine in this one invocation and are reported as ratios.
`make bench ONLY=storage_overhead` (or throughput, time_to_accuracy, scaling, sigterm) runs one suite. The peers (PyTorch,
JAX) get their own virtual environments under build/peers/ on first use.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from trainer.runtime import load_tensorflow, set_tensorflow_env

set_tensorflow_env()  # TensorFlow loads here as in `python -m trainer`: its C++ start-up lines held back
load_tensorflow()

from bench import scaling, sigterm, storage_overhead, throughput, time_to_accuracy  # noqa: E402
from bench import docs  # noqa: E402
from bench.common import cpu_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
SUITES = {"throughput": throughput, "time_to_accuracy": time_to_accuracy, "scaling": scaling,
          "storage_overhead": storage_overhead, "sigterm": sigterm}


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
        if not only or name in only.split(","):
            results[name] = {**suite.run(), "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model()}
            with open(RESULTS, "w") as f:  # after every suite: a later failure keeps what was measured
                json.dump(results, f, indent=2)
                f.write("\n")
    docs.main([])  # the docs' tables, from what results.json now holds
    for name, suite in SUITES.items():
        if name in results:
            for label, value in suite.rows(results[name]):
                print(f"{label:<44}{value}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
