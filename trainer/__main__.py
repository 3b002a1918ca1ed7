"""`python -m trainer` and `mnist-trainer`: the container's entrypoint. SIGTERM is taken before anything else
loads (importing the command line and its modules takes ~0.1 s, a window in which the signal would kill)."""

import sys

from trainer.sigterm import StopSignal


def run() -> int:
    """Take SIGTERM as a flag, then run the command line."""
    stop = StopSignal().install()
    from trainer.cli import main

    return main(stop=stop)


if __name__ == "__main__":
    sys.exit(run())
