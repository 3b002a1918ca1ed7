"""Real MNIST and Fashion-MNIST: counts, pixels, sources, IDX files and their verification."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, needs_offline_copy
from trainer import datasets
from trainer.config import DataConfig
from trainer.datasets import DataError, load_split

MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("dataset, split, counts", [
    ("mnist", "train", MNIST_TRAIN),
    ("mnist", "test", MNIST_TEST),
    pytest.param("fashion_mnist", "train", [6000] * 10, marks=needs_offline_copy("fashion_mnist")),
    pytest.param("fashion_mnist", "test", [1000] * 10, marks=needs_offline_copy("fashion_mnist")),
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
        f for pair in datasets.IDX_FILES.values() for f in pair)


def test_missing_data_files_are_a_data_error(tmp_path):
    with pytest.raises(DataError, match=f"missing data files in {tmp_path}/idx/mnist .*--data-dir {tmp_path}"):
        load_split(DataConfig(dataset="mnist", data_dir=str(tmp_path), data_source="idx"), "train")


def test_corrupt_and_wrong_data_files_are_data_errors(tmp_path, data_dir):
    folder = tmp_path / "idx" / "mnist"
    folder.mkdir(parents=True)
    source = datasets.idx_dir(data_dir, "mnist")
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
    datasets.write_idx(str(tmp_path / "x.gz"), array)
    np.testing.assert_array_equal(datasets.read_idx(str(tmp_path / "x.gz")), array)


def test_auto_source_asks_tfds_only_where_it_may_have_prepared_the_dataset(data_dir, tmp_path):
    # In a fresh process: whether TFDS (a second or so to import and probe) was imported shows in sys.modules.
    probe = ("import sys; from trainer.datasets import resolve_source; "
             "print(resolve_source('mnist', sys.argv[1]), 'tensorflow_datasets' in sys.modules)")

    def resolve(folder: str) -> str:
        result = subprocess.run([sys.executable, "-c", probe, folder], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip()

    assert resolve(data_dir) == "idx False"  # IDX files, no TFDS folder: TFDS is not imported
    # A TFDS folder of the dataset that holds no prepared version: TFDS is asked, and the IDX files are used.
    shutil.copytree(data_dir, tmp_path / "data")
    os.makedirs(tmp_path / "data" / "mnist" / "3.0.1")
    assert resolve(str(tmp_path / "data")) == "idx True"


def _copy_idx(data_dir: str, to: str) -> str:
    """A data dir of its own holding the real MNIST IDX files; returns its IDX folder."""
    folder = datasets.idx_dir(to, "mnist")
    shutil.copytree(datasets.idx_dir(data_dir, "mnist"), folder)
    return folder


def test_splits_read_ahead_are_the_ones_load_split_returns_and_files_changed_since_are_read_again(
        data_dir, tmp_path):
    folder = _copy_idx(data_dir, str(tmp_path))
    config = DataConfig(dataset="mnist", data_dir=str(tmp_path), data_source="auto")
    direct = {split: load_split(config, split) for split in datasets.SPLITS}
    datasets.read_ahead(config)
    assert len(datasets._reading) == 2
    for split in datasets.SPLITS:
        ahead = load_split(config, split)
        np.testing.assert_array_equal(ahead.images, direct[split].images)
        np.testing.assert_array_equal(ahead.labels, direct[split].labels)
        assert ahead.source == "idx"
    assert not datasets._reading  # each read taken once
    # A file replaced after its read began (here: truncated) is read again, and its damage reported.
    datasets.read_ahead(config, ("test",))
    images = os.path.join(folder, "t10k-images-idx3-ubyte.gz")
    original = open(images, "rb").read()
    os.remove(images)
    with open(images, "wb") as f:
        f.write(original[:5000])
    with pytest.raises(DataError, match="corrupt data file"):
        load_split(config, "test")
    datasets._reading.clear()  # the stale read is never used


def test_no_read_ahead_where_load_split_would_ask_tfds_or_import_a_copy(data_dir, tmp_path):
    _copy_idx(data_dir, str(tmp_path / "tfds"))
    os.makedirs(tmp_path / "tfds" / "mnist")  # TFDS may hold it: resolving the source needs TensorFlow
    datasets.read_ahead(DataConfig(dataset="mnist", data_dir=str(tmp_path / "tfds"), data_source="auto"))
    datasets.read_ahead(DataConfig(dataset="mnist", data_dir=str(tmp_path / "none"), data_source="auto"))
    datasets.read_ahead(DataConfig(dataset="mnist", data_dir=str(tmp_path / "tfds"), data_source="tfds"))
    assert not datasets._reading
