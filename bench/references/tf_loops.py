"""The throughput references on the cnn preset's model: `tutorial` (the TensorFlow tutorial's GradientTape loop in
a tf.function, Adam, tf.data shuffle + batch) or `fit` (Keras model.fit); prints examples/sec as JSON.

Usage: python -m bench.references.tf_loops tutorial|fit BATCH WARMUP_STEPS TIMED_STEPS
"""

from __future__ import annotations

import json
import sys
import time

import keras
import tensorflow as tf

from trainer.config import DataConfig
from trainer.datasets import load_split
from trainer.models import build_model


def tutorial_loop(model: keras.Model, dataset: tf.data.Dataset, warmup: int, timed: int) -> float:
    """Seconds for `timed` steps of the tutorial's loop, after `warmup` steps."""
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.Adam()

    @tf.function
    def train_step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_object(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    loss = tf.constant(0.0)
    for i, (images, labels) in enumerate(dataset.repeat()):
        if i == warmup:
            float(loss)
            start = time.perf_counter()
        loss = train_step(images, labels)
        if i == warmup + timed - 1:
            float(loss)
            return time.perf_counter() - start
    raise AssertionError("the dataset ended")


def keras_fit(model: keras.Model, dataset: tf.data.Dataset, warmup: int, timed: int) -> float:
    """Seconds for `timed` steps of model.fit, after a `warmup`-step fit."""
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(dataset.take(warmup), epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(dataset.repeat().take(timed), epochs=1, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    """Run one reference and print its examples/sec."""
    kind, batch, warmup, timed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    train = load_split(DataConfig(), "train")
    keras.utils.set_random_seed(0)
    model = build_model("cnn")
    dataset = tf.data.Dataset.from_tensor_slices((train.images, train.labels)).shuffle(10000).batch(batch)
    seconds = {"tutorial": tutorial_loop, "fit": keras_fit}[kind](model, dataset, warmup, timed)
    print(json.dumps({"examples_per_sec": timed * batch / seconds}))


if __name__ == "__main__":
    main()
