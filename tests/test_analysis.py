"""`analyze`: every plot is a valid PNG and the numbers behind each one are right."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from google.cloud import storage
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli
from trainer.analysis import analyze, load_inputs
from trainer.config import config_from_dict
from trainer.run_dir import RunFolder

COMMON = ["predictions", "label_distribution", "curves", "confusion_matrix", "optimal_inputs"]


@pytest.fixture(scope="module")
def cnn_analysis(cnn_run):
    config, folder, metrics = cnn_run
    return folder, metrics, analyze(folder, config), config


@pytest.fixture(scope="module")
def dense_run(emulator, data_dir, tmp_path_factory):
    """mlp300 trained for one epoch into a bucket, then analysed there through the CLI."""
    storage.Client().create_bucket("analysis")
    scratch = tmp_path_factory.mktemp("scratch")
    train = run_cli("train", "--model", "mlp300", "--epochs", "1", "--output-dir", "gs://analysis/runs",
                    "--run", "dense", "--data-dir", data_dir, "--scratch-dir", str(scratch))
    assert train.returncode == 0, train.stderr[-3000:]
    for _ in range(2):  # a second analysis replaces the first
        result = run_cli("analyze", "--output-dir", "gs://analysis/runs", "--run", "dense", "--data-dir", data_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr == ""
    local = tmp_path_factory.mktemp("fetched")
    for blob in storage.Client().list_blobs("analysis", prefix="runs/dense/"):
        path = local / blob.name[len("runs/dense/"):]
        path.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(path))
    return RunFolder(str(local))


def _assert_pngs(folder: RunFolder, names: list[str]) -> None:
    for name in names:
        path = folder.path("analysis", f"{name}.png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] >= 400 and image.size[1] >= 200, name


def test_cnn_analysis_files_and_numbers(cnn_analysis, data_dir):
    folder, metrics, summary, _ = cnn_analysis
    _assert_pngs(folder, COMMON + ["feature_maps"])
    assert not os.path.exists(folder.path("analysis", "hidden_fingerprints.png"))  # conv model
    saved = json.loads(open(folder.path("analysis", "summary.json")).read())
    assert saved["label_distribution_percent"] == summary["label_distribution_percent"]

    shares = summary["label_distribution_percent"]
    assert sum(shares["train"]) == pytest.approx(100, abs=1e-3) and sum(shares["test"]) == pytest.approx(100, abs=1e-3)
    assert shares["test"][1] == pytest.approx(11.35)  # 1135 of 10,000 test images are ones

    matrix = np.array(summary["confusion"]["confusion_matrix"])
    assert matrix.sum() == 10_000
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["test_accuracy"], abs=1e-4)

    curves = summary["curves"]
    assert len(curves["train_loss"]) == len(curves["test_accuracy"]) == 1
    assert curves["test_accuracy"][-1] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert summary["feature_maps"] == {"layer": "conv1", "image": 0, "shape": [26, 26, 32]}
    assert len(summary["predictions"]["random"]) == len(summary["predictions"]["most_confidently_wrong"]) == 9


def test_optimal_inputs_are_classified_as_their_class(cnn_analysis):
    folder, _, summary, config = cnn_analysis
    inputs = np.load(folder.path("analysis", "optimal_inputs.npy"))
    assert inputs.shape == (10, 28, 28, 1) and inputs.min() >= 0 and inputs.max() <= 1
    model = load_inputs(folder, config).model
    # Fed back as raw pixels through the whole model, each optimal input wins its own class.
    pixels = np.round(inputs * 255).astype(np.uint8)
    probabilities = tf.nn.softmax(model(pixels, training=False)).numpy()
    for c in range(10):
        assert probabilities[c, c] > 0.9, (c, probabilities[c])
    assert summary["optimal_inputs"]["l2"] == 0.25


def test_analysis_images_and_the_confusion_table_are_in_tensorboard(cnn_analysis):
    folder, metrics, _, _ = cnn_analysis
    events = EventAccumulator(folder.path("logs", "analysis"))
    events.Reload()
    # One `analysis/` group, at the step of the checkpoint analysed (not 0, which reads as the untrained model).
    tags = {f"analysis/{name}" for name in COMMON + ["feature_maps", "confusion_table"]}
    assert tags <= set(events.Tags()["tensors"])
    assert set(events.PluginTagToContent("text")) == {"analysis/confusion_table"}
    assert {event.step for tag in tags for event in events.Tensors(tag)} == {metrics["steps"]}
    table = tf.make_ndarray(events.Tensors("analysis/confusion_table")[0].tensor_proto).item().decode()
    assert f"Test accuracy **{metrics['test_accuracy']:.2%}**" in table
    row = metrics["confusion_matrix"][3]  # true 3, every count in its row
    assert f"| **3** | {' | '.join(map(str, row))} | " in table


def test_a_repeated_analysis_leaves_one_set_of_images_in_tensorboard(dense_run):
    assert len(os.listdir(dense_run.path("logs", "analysis"))) == 1


def test_dense_analysis_in_a_bucket_has_real_hidden_fingerprints(dense_run, data_dir):
    _assert_pngs(dense_run, COMMON + ["hidden_fingerprints"])
    assert not os.path.exists(dense_run.path("analysis", "feature_maps.png"))
    summary = json.loads(open(dense_run.path("analysis", "summary.json")).read())
    fingerprints = summary["hidden_fingerprints"]
    assert fingerprints["layer"] == "hidden1" and fingerprints["units"] == 300
    activations = np.load(dense_run.path("analysis", "hidden_fingerprints.npy"))
    # Recompute the first hidden layer by hand from the checkpoint's weights: relu(x/255 W + b).
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(dense_run.checkpoints))
    names = reader.get_variable_to_shape_map()
    kernel = next(reader.get_tensor(n) for n in names if names[n] == [784, 300])
    bias = next(reader.get_tensor(n) for n in names if names[n] == [300] and "optimizer" in n and "/1/" in n)
    test = load_inputs(dense_run, config_from_dict(dense_run.read_json("config.json"))).test
    images = test.images[fingerprints["images"]].reshape(-1, 784).astype(np.float32) / 255
    np.testing.assert_allclose(activations, np.maximum(images @ kernel + bias, 0), atol=1e-4)
    labels = test.labels[fingerprints["images"]]
    assert labels.tolist() == sorted(labels.tolist()) and np.bincount(labels).tolist() == [20] * 10
