"""Model registry: parameter counts of the reference architectures; ReLU after max-pool changes nothing; the fused
batch norm computes what Keras's does."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.checkpoints import Checkpoints
from trainer.models import MODELS, ChannelBias, FusedBatchNormalization, build_model


@pytest.mark.parametrize("name, parameters", [
    ("mlp3x256", 784 * 256 + 256 + 2 * (256 * 256 + 256) + 256 * 10 + 10),  # 335,114
    ("cnn", 693_962),
    ("mlp300", 784 * 300 + 300 + 300 * 10 + 10),  # 238,510
])
def test_reference_models_have_the_published_parameter_counts(name, parameters):
    assert build_model(name).count_params() == parameters


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_map_uint8_images_to_ten_logits(name):
    model = build_model(name)
    images = np.zeros((3, 28, 28, 1), np.uint8)
    assert model(images, training=False).shape == (3, 10)
    assert model.inputs[0].dtype == "uint8"


def _relu_then_pool(model: keras.Model, images: np.ndarray) -> tf.Tensor:
    """The model's layer chain as textbooks write it: each bias and ReLU applied before the max-pool preceding
    them."""
    chain, x, i = model.layers[1:], images, 0
    while i < len(chain):
        if isinstance(chain[i], keras.layers.MaxPooling2D) and isinstance(chain[i + 1], ChannelBias):
            x, i = chain[i](chain[i + 2](chain[i + 1](x))), i + 3
        elif isinstance(chain[i], keras.layers.MaxPooling2D) and isinstance(chain[i + 1], keras.layers.Activation):
            x, i = chain[i](chain[i + 1](x)), i + 2
        else:
            x, i = chain[i](x, training=False), i + 1
    return x


@pytest.mark.parametrize("name", ["cnn", "lenet_bn", "convnet_bn"])
def test_pooling_before_bias_and_relu_gives_the_same_logits_and_gradients(name, mnist):
    model = build_model(name)
    assert any(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, ChannelBias):  # trained values, not the zeros they start from
            layer.bias.assign(rng.normal(0.0, 0.3, layer.bias.shape).astype("float32"))
    images, labels = mnist["test"].images[:32], mnist["test"].labels[:32]
    results = []
    for forward in (lambda: model(images, training=False), lambda: _relu_then_pool(model, images)):
        with tf.GradientTape() as tape:
            logits = forward()
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        results.append([logits, *tape.gradient(loss, model.trainable_variables)])
    for ours, textbook in zip(*results):
        np.testing.assert_allclose(ours.numpy(), textbook.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(16, 6, 6, 5), (32, 5)])
def test_fused_batch_norm_trains_and_infers_as_keras_batch_norm(shape):
    """Outputs, gradients (inputs, scale, offset) and moving statistics of a training pass, then inference; the
    2-D case (convnet_bn's dense layer) takes Keras's own path."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, shape).astype("float32"))
    upstream = tf.constant(rng.normal(size=shape).astype("float32"))
    results = []
    for layer in (keras.layers.BatchNormalization(), FusedBatchNormalization()):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 1.5, shape[-1]).astype("float32"))
        layer.beta.assign(np.linspace(-1.0, 1.0, shape[-1]).astype("float32"))
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * upstream)
        results.append([layer(x, training=True), *tape.gradient(loss, [x, layer.gamma, layer.beta]),
                        layer.moving_mean, layer.moving_variance, layer(x, training=False)])
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(np.asarray(fused_value), np.asarray(keras_value), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_with_the_bias_in_the_conv_layer_restores_into_todays_cnn(tmp_path, mnist):
    """Runs saved before the bias moved after the pool resume with the same function: the conv's bias is
    restored into the ChannelBias layer (the checkpoint holds the weights as the optimizer's list, in order)."""
    layers = keras.layers
    images = keras.Input((28, 28, 1), dtype="uint8", name="images")
    x = layers.Rescaling(1.0 / 255, name="rescale")(images)
    x = layers.MaxPooling2D(2, name="pool1")(layers.Conv2D(32, 3, name="conv1")(x))
    x = layers.Flatten(name="flatten")(layers.Activation("relu", name="conv1_relu")(x))
    x = layers.Dense(128, activation="relu", name="hidden1")(x)
    before = keras.Model(images, layers.Dense(10, name="logits")(x))
    rng = np.random.default_rng(1)
    for variable in before.trainable_variables:
        variable.assign(rng.normal(0.0, 0.1, variable.shape).astype("float32"))
    optimizers = []
    for model in (before, today := build_model("cnn")):
        optimizers.append(keras.optimizers.Adam())
        optimizers[-1].build(model.trainable_variables)
    Checkpoints(str(tmp_path), before, optimizers[0]).save(step=7, epoch=0)
    assert Checkpoints(str(tmp_path), today, optimizers[1]).restore("the run", print) == (7, [])
    np.testing.assert_array_equal(today.get_layer("conv1_bias").bias.numpy(), before.get_layer("conv1").bias.numpy())
    sample = mnist["test"].images[:64]
    np.testing.assert_allclose(today(sample).numpy(), before(sample).numpy(), rtol=1e-5, atol=1e-5)
