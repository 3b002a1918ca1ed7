"""The keras.io MNIST convnet recipe as published (Conv32-Pool-Conv64-Pool-Dropout-Dense softmax, Adam, batch 128,
validation_split 0.1, up to 15 epochs) on the project's MNIST arrays. After each epoch it evaluates the test set,
prints the accuracy and the time as JSON, and stops at the target.

Usage: python -m bench.references.keras_io_convnet TARGET
"""

from __future__ import annotations

import sys
from typing import Any

import keras
import numpy as np
from keras import layers

from bench.references import report_evaluation
from trainer.config import DataConfig
from trainer.datasets import load_split


class TestAccuracy(keras.callbacks.Callback):
    """Print the test accuracy after each epoch; stop once it reaches the target."""

    def __init__(self, x: np.ndarray, y: np.ndarray, target: float) -> None:
        super().__init__()
        self.x, self.y, self.target = x, y, target

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        accuracy = self.model.evaluate(self.x, self.y, verbose=0)[1]
        report_evaluation(epoch + 1, accuracy)
        if accuracy >= self.target:
            self.model.stop_training = True


def main() -> None:
    """Train the recipe until the target or 15 epochs."""
    target = float(sys.argv[1])
    train, test = load_split(DataConfig(), "train"), load_split(DataConfig(), "test")
    x_train, x_test = train.images.astype("float32") / 255, test.images.astype("float32") / 255
    y_train, y_test = keras.utils.to_categorical(train.labels, 10), keras.utils.to_categorical(test.labels, 10)
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=128, epochs=15, validation_split=0.1, verbose=0,
              callbacks=[TestAccuracy(x_test, y_test, target)])


if __name__ == "__main__":
    main()
