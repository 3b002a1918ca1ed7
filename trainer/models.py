"""MODELS registry: name -> Keras builder. Every model takes raw uint8 pixels and returns logits."""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf
from keras import layers

from trainer.datasets import IMAGE_SHAPE, NUM_CLASSES


def _inputs() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    # Normalisation is part of the model, so training and serving see the same graph.
    images = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="images")
    return images, layers.Rescaling(1.0 / 255, name="rescale")(images)


def _logits(x: keras.KerasTensor) -> keras.KerasTensor:
    # float32 even under a mixed-precision policy: the softmax cross-entropy needs the range.
    return layers.Dense(NUM_CLASSES, dtype="float32", name="logits")(x)


class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization (same variables, checkpoints and inference) whose training pass on NHWC maps
    runs TensorFlow's fused kernel: Keras computes the batch moments and the normalisation with ~15 separate
    ops (and as many in the gradient), ~1.2 of a 7.4 ms lenet_bn step on 2 cores of an Intel Xeon
    (bench/FINDINGS.md)."""

    def call(self, inputs: tf.Tensor, training: bool | None = None, mask: tf.Tensor | None = None) -> tf.Tensor:
        """Normalise by the batch's moments and update the moving ones when training; else Keras's own pass."""
        if not (training and self.trainable) or mask is not None or len(inputs.shape) != 4 \
                or self.axis not in (-1, 3) or self.synchronized or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=tf.cast(inputs, "float32"), scale=self.gamma if self.scale else tf.ones_like(self.moving_mean),
            offset=self.beta if self.center else tf.zeros_like(self.moving_mean), mean=tf.zeros([0]),
            variance=tf.zeros([0]), epsilon=self.epsilon, data_format="NHWC", is_training=True)
        # The kernel returns the unbiased batch variance for the moving average; Keras averages the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), "float32")
        variance = variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)


class ChannelBias(layers.Layer):
    """A learned offset per channel: a conv layer's bias, added after its max-pool (see `_pooled_relu`)."""

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """One zero-initialised offset per channel of the input."""
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        """The inputs plus the channel's offset (TensorFlow's BiasAdd)."""
        return keras.ops.add(inputs, self.bias)


# Moving statistics start at mean 0, variance 1. convnet_bn's first maps have a variance near 0.003: at Keras's
# momentum 0.99 the moving variance still held ~3x the true one after a 468-step epoch (test accuracy 43.9% with
# moving statistics against 99.0% with the batch's); at 0.9 (PyTorch's default) it forgets its start in ~50 steps.
BN_MOMENTUM_CONVNET = 0.9


def _dense_stack(name: str, widths: tuple[int, ...]) -> keras.Model:
    images, x = _inputs()
    x = layers.Flatten(name="flatten")(x)
    for i, width in enumerate(widths):
        x = layers.Dense(width, activation="relu", kernel_initializer="glorot_uniform", name=f"hidden{i + 1}")(x)
    logits = _logits(x)
    return keras.Model(images, logits, name=name)


def mlp3x256() -> keras.Model:
    """784-256-256-256-10 ReLU network with Glorot initialisation."""
    return _dense_stack("mlp3x256", (256, 256, 256))


def mlp300() -> keras.Model:
    """784-300-10 ReLU network."""
    return _dense_stack("mlp300", (300,))


def _pooled_relu(x: keras.KerasTensor, block: int, bias: bool = False) -> keras.KerasTensor:
    # max-pool(ReLU(x + b)) == ReLU(max-pool(x) + b) with the same gradients: ReLU is monotone and a channel's
    # bias is constant over each window. Same model, cheaper step: the ReLU, the bias and their gradients touch
    # a quarter of the values, and the convolution before has no bias, so TensorFlow runs oneDNN's plain
    # filter-gradient kernel instead of its filter-and-bias one (cnn on an Intel Xeon: ~0.85 against ~0.33 ms).
    x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
    if bias:
        x = ChannelBias(name=f"conv{block}_bias")(x)
    return layers.Activation("relu", name=f"conv{block}_relu")(x)


def cnn() -> keras.Model:
    """Conv2D(32, 3x3) -> ReLU, MaxPool 2x2 -> Dense 128 -> Dense 10: 693,962 parameters."""
    images, x = _inputs()
    x = _pooled_relu(layers.Conv2D(32, 3, use_bias=False, name="conv1")(x), 1, bias=True)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="hidden1")(x)
    logits = _logits(x)
    return keras.Model(images, logits, name="cnn")


def _conv_bn_block(x: keras.KerasTensor, block: int, filters: int, size: int, padding: str,
                   momentum: float = 0.99) -> keras.KerasTensor:
    """Conv (no bias: batch norm re-centres) -> batch norm -> ReLU, 2x2 max-pool, named conv{block}..."""
    x = layers.Conv2D(filters, size, padding=padding, use_bias=False, name=f"conv{block}")(x)
    x = FusedBatchNormalization(momentum=momentum, name=f"conv{block}_bn")(x)
    return _pooled_relu(x, block)


def convnet_bn() -> keras.Model:
    """Three conv blocks (32, 64, 128 filters; 3x3, batch norm, max-pool), Dense 256 with dropout."""
    images, x = _inputs()
    for block, filters in enumerate((32, 64, 128), start=1):
        x = _conv_bn_block(x, block, filters, 3, "same", BN_MOMENTUM_CONVNET)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, use_bias=False, name="hidden1")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM_CONVNET, name="hidden1_bn")(x)
    x = layers.Activation("relu", name="hidden1_relu")(x)
    x = layers.Dropout(0.4, name="dropout")(x)
    logits = _logits(x)
    return keras.Model(images, logits, name="convnet_bn")


def lenet_bn() -> keras.Model:
    """LeNet-style: Conv 5x5x16 -> MaxPool -> Conv 5x5x32 + batch norm -> MaxPool -> Dense 128: 80,298 parameters.
    Few FLOPs per image (2.2 M forward) and quick to converge: our fastest preset to 99% on MNIST.
    Batch norm only where activations are small (8x8x32): on the 24x24x16 maps it costs more than it gives."""
    images, x = _inputs()
    x = _pooled_relu(layers.Conv2D(16, 5, use_bias=False, name="conv1")(x), 1, bias=True)
    x = _conv_bn_block(x, 2, 32, 5, "valid")
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="hidden1")(x)
    logits = _logits(x)
    return keras.Model(images, logits, name="lenet_bn")


MODELS: dict[str, Callable[[], keras.Model]] = {
    "mlp3x256": mlp3x256,
    "cnn": cnn,
    "mlp300": mlp300,
    "convnet_bn": convnet_bn,
    "lenet_bn": lenet_bn,
}


def build_model(name: str, precision: str = "float32") -> keras.Model:
    """Build a fresh model by registry name under a Keras dtype policy (call inside `strategy.scope()`)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # layers keep the policy they were built with
    try:
        return MODELS[name]()
    finally:
        keras.config.set_dtype_policy(previous)

