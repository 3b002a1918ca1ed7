"""One worker of a 3-worker group on 127.0.0.1, set up as the trainer sets one up (make_strategy, peer_failures),
for test_distribute. Worker 2 dies after the first all-reduce. Worker 0 then meets the loss as a collective that
involved worker 2 reports it (the error TensorFlow raises then, once the file `dead` in argv[1] exists) and exits.
Worker 1, busy outside any collective until then (until the file `go` exists), meets the loss after, in a real
all-reduce. Each survivor prints the PeerLost message it would report."""

from __future__ import annotations

import os
import signal
import sys
import time

import tensorflow as tf

from trainer.cluster import INDEX_ENV
from trainer.config import RuntimeConfig
from trainer.distribute import PeerLost, cluster_of, make_strategy, peer_failures


def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.05)


def main(flags: str) -> None:
    """Run this worker's part (see the module docstring)."""
    index = int(os.environ[INDEX_ENV])
    strategy = make_strategy(RuntimeConfig(peer_timeout=60.0, startup_timeout=60.0))
    cluster = cluster_of(strategy)

    @tf.function
    def all_reduce() -> tf.Tensor:
        return strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

    assert float(all_reduce()) == 3.0
    if index == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        with peer_failures(cluster):
            if index == 0:
                _wait_for(os.path.join(flags, "dead"))
                raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Socket closed")
            _wait_for(os.path.join(flags, "go"))
            all_reduce()
    except PeerLost as lost:
        print(lost, flush=True)
    os._exit(0)  # not TensorFlow's teardown, which waits for the peers that are gone


if __name__ == "__main__":
    main(sys.argv[1])
