"""SavedModel export with a uint8 serving signature (written whole or not at all), and prediction from PNG files."""

from __future__ import annotations

import os
import shutil
from typing import Callable, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from trainer.config import IMAGE_TYPES
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


_DARK_BACKGROUND = 128  # mean border pixel below this: a light digit on a dark background, as MNIST


class ImageError(ValueError):
    """An image that cannot be classified (unreadable, not an image)."""


def percent(probability: float) -> str:
    """A probability as a percentage that never rounds up to a certainty it is not."""
    return f"{probability:.2%}" if probability < 0.9999 else "> 99.99%"


def read_image(path: str, polarity: str = "auto") -> tuple[np.ndarray, list[str]]:
    """An image file as MNIST sees digits: uint8 [28, 28, 1], a light digit on a dark background; with a note
    for every conversion made (bit depth, alpha, colour, size, inversion)."""
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
    except tf.errors.OpError as error:
        raise ImageError(f"not an image TensorFlow can read ({', '.join(IMAGE_TYPES)})") from error
    notes = []
    pixels = image.numpy()
    if pixels.dtype == np.uint16:
        pixels, notes = (pixels // 257).astype(np.uint8), notes + ["16-bit -> 8-bit"]
    pixels = pixels.astype(np.float32)
    height, width, channels = pixels.shape
    if channels in (2, 4):  # drawn on a transparent canvas: show it as a viewer does, on white
        alpha = pixels[..., -1:] / 255.0
        pixels = pixels[..., :-1] * alpha + 255.0 * (1 - alpha)
        if alpha.min() < 1.0:  # an alpha channel that is opaque everywhere changes nothing
            notes.append("transparency on white")
    if pixels.shape[-1] == 3:
        pixels = pixels @ np.array([[0.299], [0.587], [0.114]], np.float32)
        notes.append("colour -> grey")
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if polarity == "dark-on-light" or (polarity == "auto" and border.mean() >= _DARK_BACKGROUND):
        pixels = 255.0 - pixels
        notes.append("inverted (dark digit on light background)")
    if (height, width) != IMAGE_SHAPE[:2]:
        side = max(height, width)  # pad to a square first: the digit keeps its aspect ratio
        pixels = np.pad(pixels, [((side - height) // 2, (side - height + 1) // 2),
                                 ((side - width) // 2, (side - width + 1) // 2), (0, 0)])
        pixels = tf.image.resize(pixels, IMAGE_SHAPE[:2], antialias=True).numpy()
        notes.append(f"resized {width}x{height} -> {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]}")
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8), notes


class Prediction(NamedTuple):
    """What predict says of one image file: its class, or why it has none."""

    path: str
    label: int = -1
    probability: float = 0.0
    notes: tuple[str, ...] = ()  # the conversions made
    error: ImageError | None = None


def predict_files(model_dir: str, paths: list[str], polarity: str = "auto") -> list[Prediction]:
    """A Prediction for each image file, in order; files that cannot be read carry their error."""
    serve = load_serving(model_dir)
    read: list[tuple[str, np.ndarray, list[str]]] = []
    results: dict[str, Prediction] = {}
    for path in paths:
        try:
            image, notes = read_image(path, polarity)
        except ImageError as error:
            results[path] = Prediction(path, error=error)
            continue
        read.append((path, image, notes))
    if read:
        out = serve(images=tf.constant(np.stack([image for _, image, _ in read])))
        classes, probabilities = out["classes"].numpy(), out["probabilities"].numpy()
        for i, (path, _, notes) in enumerate(read):
            results[path] = Prediction(path, int(classes[i]), float(probabilities[i, classes[i]]), tuple(notes))
    return [results[path] for path in paths]
