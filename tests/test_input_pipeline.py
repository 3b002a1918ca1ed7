"""The per-replica input pipeline on real MNIST: index streams, resident splits, gathers, shifts."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer import input_pipeline
from trainer.config import RuntimeConfig
from trainer.datasets import Split
from trainer.distribute import make_strategy
from trainer.loop import Schedule


def _small(split: Split, n: int) -> Split:
    return Split(images=split.images[:n], labels=split.labels[:n], source=split.source)


def _chunks(split: Split, batch: int, epochs: int, start_step: int = 0, steps_per_loop: int = 4):
    per_epoch = len(split) // batch
    return Schedule(per_epoch, per_epoch * epochs, steps_per_loop, 100, batch).chunks(start_step)


def _host_batches_fn(split: Split, batch: int, epochs: int, seed: int, start_step: int = 0, augment: bool = False):
    """The trainer's index stream, one batch per step, gathered on the host by the same gather_batch."""
    index_fn = input_pipeline.train_index_fn(len(split), batch, seed, _chunks(split, batch, epochs, start_step),
                                             augment)
    images, labels = tf.constant(split.images), tf.constant(split.labels)
    return lambda context: index_fn(context).unbatch().map(lambda b: input_pipeline.gather_batch(images, labels, b))


def _global_batches(split: Split, batch: int, start_step: int = 0, steps: int = 3) -> list[np.ndarray]:
    fn = _host_batches_fn(split, batch, epochs=2, seed=3, start_step=start_step)
    ds = fn(tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=1))
    return [images.numpy() for images, _ in ds.take(steps)]


def test_two_replicas_gather_disjoint_halves_of_each_global_batch_on_their_own_device(mnist):
    split = _small(mnist["train"], 1024)
    strategy = make_strategy(RuntimeConfig(cpu_replicas=2))
    resident = input_pipeline.resident_split(strategy, split)
    assert [images.device.split("/")[-1] for images, _ in strategy.experimental_local_results(resident)] == \
        ["device:CPU:0", "device:CPU:1"]
    chunks = _chunks(split, 64, epochs=2)
    dataset = strategy.distribute_datasets_from_function(input_pipeline.train_index_fn(len(split), 64, 3, chunks))
    gather = tf.function(lambda block, step: strategy.run(
        lambda s, b: input_pipeline.gather_batch(*s, {"indices": b["indices"][step]}), args=(resident, block)))
    expected = _global_batches(split, 64, steps=16)
    blocks = list(dataset)
    # One block per chunk and replica, each as long as its chunk: 16 steps per epoch, chunks of 4.
    assert [len(strategy.experimental_local_results(b["indices"])[1]) for b in blocks] == \
        [stop - start for start, stop in chunks] == [4] * 8
    for step, whole in enumerate(expected):
        block = blocks[step // 4]
        images, labels = gather(block, step % 4)
        first, second = (t.numpy() for t in strategy.experimental_local_results(images))
        assert first.shape == second.shape == (32, 28, 28, 1)
        # Each replica holds its own half of the global batch, in order, with no overlap.
        np.testing.assert_array_equal(np.concatenate([first, second]), whole)
        assert not {a.tobytes() for a in first} & {b.tobytes() for b in second}
        indices = np.concatenate([b[step % 4] for b in strategy.experimental_local_results(block["indices"])])
        np.testing.assert_array_equal(np.concatenate(strategy.experimental_local_results(labels)), split.labels[indices])


def test_epochs_are_reshuffled_by_seed_and_resume_continues_the_stream(mnist):
    split = _small(mnist["train"], 640)  # 10 steps of 64 per epoch
    stream = _global_batches(split, 64, steps=20)
    assert sorted(map(bytes, np.concatenate(stream[:10]))) == sorted(map(bytes, np.concatenate(stream[10:])))
    assert not np.array_equal(stream[0], stream[10])  # epoch 2 is another order
    resumed = _global_batches(split, 64, start_step=13, steps=5)
    for a, b in zip(resumed, stream[13:18]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_global_batches(split, 64, steps=1)[0], stream[0])  # same seed, same order
    with pytest.raises(ValueError, match="not a chunk of one epoch"):
        input_pipeline.train_index_fn(len(split), 64, 3, [(8, 12)])


def test_augmentation_shifts_images_deterministically(mnist):
    split = _small(mnist["train"], 256)
    fn = _host_batches_fn(split, 64, epochs=1, seed=1, augment=True)
    context = tf.distribute.InputContext()
    a = next(iter(fn(context)))[0].numpy()
    b = next(iter(fn(context)))[0].numpy()
    plain = next(iter(_host_batches_fn(split, 64, epochs=1, seed=1)(context)))[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, plain)
    # Every image is its plain self moved by at most AUGMENT_SHIFT pixels per axis, black filled in.
    s = input_pipeline.AUGMENT_SHIFT
    padded = np.pad(plain, [(0, 0), (s, s), (s, s), (0, 0)])
    for shifted, source in zip(a, padded):
        windows = [source[r:r + 28, c:c + 28] for r in range(2 * s + 1) for c in range(2 * s + 1)]
        assert any(np.array_equal(shifted, w) for w in windows)
    # A shift moves pixels but keeps (almost all of) the ink: digits sit well inside the frame.
    assert abs(int(a.sum()) - int(plain.sum())) < 0.01 * int(plain.sum())


def test_two_workers_train_on_disjoint_shards_each_in_its_own_order_per_epoch() -> None:
    # 1,000 examples, global batch 64 over two workers (32 each): 15 steps per epoch, 480 examples per worker.
    chunks = Schedule(15, 30, 5, 100, 64).chunks(0)
    fn = input_pipeline.train_index_fn(1000, 64, 7, chunks)

    def epochs(worker: int) -> list[np.ndarray]:
        blocks = [b["indices"].numpy() for b in fn(tf.distribute.InputContext(2, worker, 2))]
        assert [len(b) for b in blocks] == [5] * 6 and blocks[0].shape[1:] == (32,)
        steps = np.concatenate(blocks)
        return [steps[:15].ravel(), steps[15:].ravel()]

    first, second = epochs(0), epochs(1)
    for worker, (one, two) in enumerate((first, second)):
        for epoch in (one, two):
            assert len(set(epoch)) == 480 and set(epoch % 2) == {worker}  # its own shard, no example twice
        assert not np.array_equal(one, two)  # each epoch in another order
    assert not set(first[0]) & set(second[0])
    np.testing.assert_array_equal(epochs(0)[1], first[1])  # the same seed, the same order
