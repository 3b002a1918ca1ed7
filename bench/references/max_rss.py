"""Run a command (its output discarded); print the peak resident memory of its process tree in KiB.

Usage: python -m bench.references.max_rss COMMAND...
"""

from __future__ import annotations

import resource
import subprocess
import sys


def main() -> None:
    """Run the command, then read the children's peak RSS."""
    subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


if __name__ == "__main__":
    main()
