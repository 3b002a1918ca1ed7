"""Per-replica tf.data pipelines over a `Split` in memory: the training index stream, the replica-resident split
the indices point into (the evaluation slices it directly), and the gather (and shift) of a batch on the device."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import tensorflow as tf

from trainer.config import steps_per_epoch
from trainer.datasets import IMAGE_SHAPE, Split

AUGMENT_SHIFT = 2  # pixels of random translation when augmenting
EPOCH_SEED_STRIDE = 100_003  # a prime: (seed, epoch) pairs map to distinct shuffle seeds


# tf.data runs its functions through AutoGraph unless told not to; these branch on no tensor, and the source
# rewrite cost ~0.1 s of every start.
_plain_graph = tf.autograph.experimental.do_not_convert


def _options() -> tf.data.Options:
    options = tf.data.Options()
    # Sharding is explicit, by input context, in the dataset functions below.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return options


def train_index_fn(
    num_examples: int, global_batch: int, seed: int, chunks: Sequence[tuple[int, int]], augment: bool = False
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """A dataset function for `distribute_datasets_from_function` yielding, per replica, one block of example
    indices per chunk of steps: {"indices": [steps, per-replica batch]} (plus {"offsets": [steps, batch, 2]} of
    the random shifts when augmenting), for the (start, stop) step ranges `chunks`, none spanning two epochs.

    The images themselves stay on each replica's device (`resident_split`) and are gathered there
    (`gather_batch`): a chunk of steps moves one tensor of indices, and the train step fetches from its input
    once per chunk, not once per step (each fetch through the distributed iterator cost ~0.2 ms of a 4.5 ms
    step). Epoch e is the worker's shard in an order fixed by (seed, e), whatever the chunks, so a run resumed
    at any chunk's start trains on exactly the examples left, and the data position needs no state in the
    checkpoint.
    """
    per_epoch = steps_per_epoch(num_examples, global_batch)
    if not chunks:
        raise ValueError("no steps to feed")
    rows_by_epoch: dict[int, list[tuple[int, int]]] = {}
    for start, stop in chunks:
        epoch = start // per_epoch
        if not start < stop <= (epoch + 1) * per_epoch:
            raise ValueError(f"steps {start}-{stop} are not a chunk of one epoch of {per_epoch} steps")
        rows_by_epoch.setdefault(epoch, []).append((start - epoch * per_epoch, stop - epoch * per_epoch))

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = context.get_per_replica_batch_size(global_batch)
        per_worker = global_batch // context.num_input_pipelines
        local = per_worker // per_replica  # replicas fed by this pipeline, in turn, one element each
        pipeline, pipelines = context.input_pipeline_id, context.num_input_pipelines
        count = per_epoch * per_worker  # examples of this pipeline's shard used per epoch

        def one_epoch(epoch: int, rows: list[tuple[int, int]]) -> tf.data.Dataset:
            epoch_seed = seed * EPOCH_SEED_STRIDE + epoch
            # Element k of the epoch goes to local replica k % local: each chunk's block for each replica.
            spans = tf.constant([(a, b, r) for a, b in rows for r in range(local)], tf.int64)

            @_plain_graph
            def blocks(epoch_seed: tf.Tensor) -> tf.data.Dataset:
                # The epoch's order of the shard in one op (a shuffle buffer filled one index at a time, then
                # batched back into a tensor, took ~0.16 s, on the way to the first step).
                order_seed, offset_seed = tf.unstack(
                    tf.random.experimental.stateless_split(tf.stack([epoch_seed, pipeline]), 2))
                shard = tf.range(pipeline, num_examples, pipelines, dtype=tf.int64)
                order = tf.random.experimental.stateless_shuffle(shard, seed=order_seed, alg="philox")[:count]
                table = {"indices": tf.reshape(order, [per_epoch, local, per_replica])}
                if augment:
                    table["offsets"] = tf.reshape(tf.random.stateless_uniform(
                        [per_epoch * local, per_replica, 2], seed=offset_seed,
                        maxval=2 * AUGMENT_SHIFT + 1, dtype=tf.int32, alg="philox"),
                        [per_epoch, local, per_replica, 2])
                return tf.data.Dataset.from_tensor_slices(spans).map(
                    _plain_graph(lambda span: {k: v[span[0]:span[1], span[2]] for k, v in table.items()}))

            return tf.data.Dataset.from_tensors(tf.constant(epoch_seed, tf.int64)).flat_map(blocks)

        epochs = [one_epoch(e, rows) for e, rows in sorted(rows_by_epoch.items())]
        ds = functools.reduce(tf.data.Dataset.concatenate, epochs)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

    return dataset_fn


def resident_split(strategy: tf.distribute.Strategy, split: Split) -> tf.distribute.DistributedValues:
    """The split's (images, labels), copied once into every replica's device memory (47 MB for MNIST)."""
    devices = strategy.extended.worker_devices

    def on_device(context: tf.distribute.ValueContext) -> tuple[tf.Tensor, tf.Tensor]:
        # Replica ids count across workers; each worker lists only its own devices.
        with tf.device(devices[context.replica_id_in_sync_group % len(devices)]):
            return tf.identity(split.images), tf.identity(split.labels)

    return strategy.experimental_distribute_values_from_function(on_device)


def gather_batch(images: tf.Tensor, labels: tf.Tensor, batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """The batch's examples from resident images and labels, shifted by its offsets if it has them."""
    x, y = tf.gather(images, batch["indices"]), tf.gather(labels, batch["indices"])
    if "offsets" in batch:
        x = _shift(x, batch["offsets"])
    return x, y


def _shift(images: tf.Tensor, offsets: tf.Tensor) -> tf.Tensor:
    """Translate each image by (offset - AUGMENT_SHIFT) pixels per axis, filling with black."""
    s, (height, width) = AUGMENT_SHIFT, IMAGE_SHAPE[:2]
    padded = tf.pad(images, [[0, 0], [s, s], [s, s], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)[tf.newaxis]
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis]
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
