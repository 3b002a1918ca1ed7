"""`make cluster-bench`: what the local control plane costs here: a build of its binaries from empty Go caches
(seconds, and the disk the caches and binaries then take), and a start and stop once built; written to
bench/cluster.json and rendered into docs/kubernetes.md. `--render` rewrites the block from the JSON alone."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import time

from bench import docs
from bench.common import ROOT, cpu_model

RESULTS = os.path.join(ROOT, "bench", "cluster.json")


def _size(folder: str) -> int:
    return int(subprocess.run(["du", "-sb", folder], check=True, capture_output=True, text=True).stdout.split()[0])


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return round(time.monotonic() - started, 1)


def measure() -> dict:
    """Build into a fresh folder with empty Go caches, then start and stop a control plane from those binaries."""
    with tempfile.TemporaryDirectory() as work:
        caches = {"GOCACHE": os.path.join(work, "go-build"), "GOMODCACHE": os.path.join(work, "go-mod")}
        binaries = os.path.join(work, "bin")
        env = {**os.environ, **caches, "CLUSTER_DIR": os.path.join(work, "cluster"), "CLUSTER_BIN": binaries}
        build = _timed(["make", "--no-print-directory", "cluster-bin", f"CLUSTER_BIN={binaries}"], env)
        sizes = {"go_caches_bytes": sum(_size(c) for c in caches.values()), "binaries_bytes": _size(binaries)}
        start = _timed([sys.executable, "-m", "tests.cluster.control_plane", "up"], env)
        stop = _timed([sys.executable, "-m", "tests.cluster.control_plane", "down"], env)
        subprocess.run(["chmod", "-R", "u+w", work], check=True)  # Go's module cache is read-only
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "cold_build_seconds": build, **sizes, "start_seconds": start, "stop_seconds": stop}


def render(r: dict) -> str:
    """The docs' lines: the machine and date once, then the figures."""
    return (f"Measured on {r['date']} ({r['cpus']} cores, {r['cpu']}): a build from empty Go caches took "
            f"{r['cold_build_seconds'] / 60:.0f} min and left {r['go_caches_bytes'] / 1e9:.1f} GB in Go's caches and "
            f"{r['binaries_bytes'] / 1e9:.1f} GB of binaries; once built, `make cluster` started it in "
            f"{r['start_seconds']:.0f} s and `make cluster-down` stopped it in {r['stop_seconds']:.0f} s.")


def main(argv: list[str]) -> int:
    """Measure (or, with --render, only re-render) and write the docs' block."""
    docs.publish("cluster", RESULTS, None if argv == ["--render"] else measure())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
