"""One training step's all-reduce, timed alone: a SUM of tensors shaped like a preset's trainable variables (its
gradients), with the trainer's own strategy. Prints JSON: bytes per all-reduce, seconds per call with and
without the all-reduce (the difference is the all-reduce).

Usage: python -m bench.references.allreduce MODEL CALLS [CPU_REPLICAS]
       (in a group: TRAINER_WORKERS and JOB_COMPLETION_INDEX set as for the trainer; worker 0 prints)
"""

from __future__ import annotations

import json
import sys
import time

from trainer.runtime import set_tensorflow_env

set_tensorflow_env()

import tensorflow as tf  # noqa: E402

from trainer.cluster import this_task  # noqa: E402
from trainer.config import RuntimeConfig  # noqa: E402
from trainer.distribute import make_strategy  # noqa: E402
from trainer.models import build_model  # noqa: E402

WARMUP_CALLS = 20


def seconds_per_call(strategy: tf.distribute.Strategy, shapes: list[tf.TensorShape], reduce: bool, calls: int) -> float:
    """Mean seconds of one `strategy.run` making gradient-shaped tensors, all-reduced or not."""

    def replica_fn() -> list[tf.Tensor]:
        grads = [tf.fill(shape, tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32))
                 for shape in shapes]
        return tf.distribute.get_replica_context().all_reduce("sum", grads) if reduce else grads

    @tf.function
    def call() -> tf.Tensor:
        outputs = strategy.run(replica_fn)
        return tf.add_n([tf.reduce_sum(t) for t in strategy.experimental_local_results(outputs[0])])

    for _ in range(WARMUP_CALLS):
        call().numpy()
    start = time.perf_counter()
    for _ in range(calls):
        call().numpy()
    return (time.perf_counter() - start) / calls


def main() -> None:
    """Time the all-reduce of one preset's gradients with the strategy the trainer would build here."""
    model, calls = sys.argv[1], int(sys.argv[2])
    replicas = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    strategy = make_strategy(RuntimeConfig(cpu_replicas=replicas))
    with strategy.scope():
        variables = build_model(model).trainable_variables
    shapes = [v.shape for v in variables]
    with_reduce = seconds_per_call(strategy, shapes, True, calls)
    without = seconds_per_call(strategy, shapes, False, calls)
    if this_task().chief:
        print(json.dumps({"model": model, "replicas": strategy.num_replicas_in_sync,
                          "bytes": 4 * sum(s.num_elements() for s in shapes),
                          "seconds_per_step": with_reduce, "seconds_without_all_reduce": without,
                          "all_reduce_seconds": with_reduce - without}))


if __name__ == "__main__":
    main()
