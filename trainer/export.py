"""SavedModel export with a uint8 serving signature (written whole or not at all), and prediction from PNG files."""

from __future__ import annotations

import os
import shutil
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from trainer.datasets import IMAGE_SHAPE
from trainer.storage import partial_path

SIGNATURE = "serving_default"


def export_model(model: keras.Model, path: str) -> None:
    """Write `model` as a SavedModel whose serving signature maps uint8 images to probabilities and classes."""

    @tf.function(input_signature=[tf.TensorSpec((None,) + IMAGE_SHAPE, tf.uint8, name="images")])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = model(images, training=False)
        return {"probabilities": tf.nn.softmax(logits), "classes": tf.argmax(logits, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve)
    # Write beside the target and swap, so a failed export never leaves half a model.
    staging = partial_path(path)
    archive.write_out(staging, verbose=False)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)


def load_serving(path: str) -> Callable[..., dict[str, tf.Tensor]]:
    """The `serving_default` function of an exported model."""
    return tf.saved_model.load(path).signatures[SIGNATURE]


def read_png(path: str) -> np.ndarray:
    """A PNG as uint8 [28, 28, 1] grayscale, resized if it is another size."""
    image = tf.io.decode_png(tf.io.read_file(path), channels=1)
    if tuple(image.shape) != IMAGE_SHAPE:
        image = tf.cast(tf.round(tf.image.resize(image, IMAGE_SHAPE[:2], antialias=True)), tf.uint8)
    return image.numpy()


def predict_files(model_dir: str, paths: list[str]) -> list[tuple[str, int, float]]:
    """(path, class, probability) for each PNG file."""
    serve = load_serving(model_dir)
    images = np.stack([read_png(p) for p in paths])
    out = serve(images=tf.constant(images))
    classes = out["classes"].numpy()
    probabilities = out["probabilities"].numpy()
    return [(p, int(c), float(probabilities[i, c])) for i, (p, c) in enumerate(zip(paths, classes))]
