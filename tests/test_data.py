"""Real MNIST and Fashion-MNIST: counts, pixels, files, and the per-replica pipelines."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from trainer import data as data_lib
from trainer.config import DataConfig, RuntimeConfig
from trainer.distribute import make_strategy
from trainer.data import DataError, Split, load_split

MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("dataset, split, counts", [
    ("mnist", "train", MNIST_TRAIN),
    ("mnist", "test", MNIST_TEST),
    ("fashion_mnist", "train", [6000] * 10),
    ("fashion_mnist", "test", [1000] * 10),
])
def test_real_data_counts_shapes_and_dtype(data_dir, dataset, split, counts):
    loaded = load_split(DataConfig(dataset=dataset, data_dir=data_dir, data_source="idx"), split)
    assert loaded.images.shape == (sum(counts), 28, 28, 1) and loaded.images.dtype == np.uint8
    assert loaded.labels.dtype == np.int64
    assert np.bincount(loaded.labels).tolist() == counts
    assert loaded.images.max() == 255 and loaded.images.min() == 0


def test_mnist_pixels_are_the_original_bytes(mnist):
    # The first MNIST training image is a 5; its raw bytes sum to 27,525 in the original IDX file.
    first = mnist["train"].images[0]
    assert mnist["train"].labels[0] == 5
    assert int(first.sum()) == 27525
    # Pixels are integers that were stored as value/256 in the pickle: no rounding residue.
    assert len(np.unique(mnist["test"].images)) == 256


def test_auto_source_imports_the_packaged_copy_once(tmp_path):
    config = DataConfig(dataset="mnist", data_dir=str(tmp_path), data_source="auto")
    assert load_split(config, "test").source == "idx"
    assert sorted(os.listdir(tmp_path / "idx" / "mnist")) == sorted(
        f for pair in data_lib.IDX_FILES.values() for f in pair)


def test_missing_data_files_are_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing data file"):
        load_split(DataConfig(dataset="mnist", data_dir=str(tmp_path), data_source="idx"), "train")


def test_corrupt_and_wrong_data_files_are_data_errors(tmp_path, data_dir):
    folder = tmp_path / "idx" / "mnist"
    folder.mkdir(parents=True)
    source = data_lib.idx_dir(data_dir, "mnist")
    for name in os.listdir(source):
        (folder / name).write_bytes(open(os.path.join(source, name), "rb").read())
    config = DataConfig(dataset="mnist", data_dir=str(tmp_path), data_source="idx")
    images = folder / "t10k-images-idx3-ubyte.gz"
    original = images.read_bytes()
    images.write_bytes(original[:5000])  # a truncated download
    with pytest.raises(DataError, match="corrupt data file"):
        load_split(config, "test")
    images.write_bytes(original)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # one wrong label
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="label counts"):
        load_split(config, "test")


def test_idx_files_round_trip(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    data_lib.write_idx(str(tmp_path / "x.gz"), array)
    np.testing.assert_array_equal(data_lib.read_idx(str(tmp_path / "x.gz")), array)


def _small(split: Split, n: int) -> Split:
    return Split(images=split.images[:n], labels=split.labels[:n], source=split.source)


def _host_batches_fn(split: Split, batch: int, epochs: int, seed: int, start_step: int = 0, augment: bool = False):
    """The trainer's index stream, gathered on the host by the same gather_batch."""
    index_fn = data_lib.train_index_fn(len(split), batch, epochs, seed, start_step, augment)
    images, labels = tf.constant(split.images), tf.constant(split.labels)
    return lambda context: index_fn(context).map(lambda b: data_lib.gather_batch(images, labels, b))


def _global_batches(split: Split, batch: int, start_step: int = 0, steps: int = 3) -> list[np.ndarray]:
    fn = _host_batches_fn(split, batch, epochs=2, seed=3, start_step=start_step)
    ds = fn(tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=1))
    return [images.numpy() for images, _ in ds.take(steps)]


def test_two_replicas_gather_disjoint_halves_of_each_global_batch_on_their_own_device(mnist):
    split = _small(mnist["train"], 1024)
    strategy = make_strategy(RuntimeConfig(cpu_replicas=2))
    resident = data_lib.resident_split(strategy, split)
    assert [images.device.split("/")[-1] for images, _ in strategy.experimental_local_results(resident)] == \
        ["device:CPU:0", "device:CPU:1"]
    dataset = strategy.distribute_datasets_from_function(data_lib.train_index_fn(len(split), 64, epochs=2, seed=3))
    gather = tf.function(lambda batch: strategy.run(lambda s, b: data_lib.gather_batch(*s, b), args=(resident, batch)))
    expected = _global_batches(split, 64)
    for batch, whole in zip(dataset, expected):
        images, labels = gather(batch)
        first, second = (t.numpy() for t in strategy.experimental_local_results(images))
        assert first.shape == second.shape == (32, 28, 28, 1)
        # Each replica holds its own half of the global batch, in order, with no overlap.
        np.testing.assert_array_equal(np.concatenate([first, second]), whole)
        assert not {a.tobytes() for a in first} & {b.tobytes() for b in second}
        indices = np.concatenate(strategy.experimental_local_results(batch["indices"]))
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
    s = data_lib.AUGMENT_SHIFT
    padded = np.pad(plain, [(0, 0), (s, s), (s, s), (0, 0)])
    for shifted, source in zip(a, padded):
        windows = [source[r:r + 28, c:c + 28] for r in range(2 * s + 1) for c in range(2 * s + 1)]
        assert any(np.array_equal(shifted, w) for w in windows)
    # A shift moves pixels but keeps (almost all of) the ink: digits sit well inside the frame.
    assert abs(int(a.sum()) - int(plain.sum())) < 0.01 * int(plain.sum())


def test_eval_pipeline_covers_every_example_once(mnist):
    split = _small(mnist["test"], 1000)
    fn = data_lib.eval_dataset_fn(split, 64)
    labels = np.concatenate([y.numpy() for _, y in fn(tf.distribute.InputContext())])
    np.testing.assert_array_equal(labels, split.labels)
