"""`make bench`: run the benchmarks, print a table and write bench/results.json."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import storage_overhead  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


def main() -> int:
    """Run every benchmark in this one invocation, on this machine."""
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "storage_overhead": storage_overhead.run(),
    }
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    s = results["storage_overhead"]
    print(f"{'benchmark':<22}{'result':>40}")
    print(f"{'gs:// vs local':<22}{s['gcs_over_local']:>32.3f} x speed"
          f"  ({s['overhead_percent']}% overhead)")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
