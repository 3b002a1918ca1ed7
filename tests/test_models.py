"""Model registry: parameter counts of the reference architectures; ReLU after max-pool changes nothing."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.models import MODELS, build_model


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
    """The model's layer chain as textbooks write it: each ReLU applied before the max-pool preceding it."""
    chain, x, i = model.layers[1:], images, 0
    while i < len(chain):
        if isinstance(chain[i], keras.layers.MaxPooling2D) and isinstance(chain[i + 1], keras.layers.Activation):
            x, i = chain[i](chain[i + 1](x)), i + 2
        else:
            x, i = chain[i](x, training=False), i + 1
    return x


@pytest.mark.parametrize("name", ["cnn", "lenet_bn", "convnet_bn"])
def test_pooling_before_relu_gives_the_same_logits_and_gradients(name, mnist):
    model = build_model(name)
    assert any(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)
    images, labels = mnist["test"].images[:32], mnist["test"].labels[:32]
    results = []
    for forward in (lambda: model(images, training=False), lambda: _relu_then_pool(model, images)):
        with tf.GradientTape() as tape:
            logits = forward()
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        results.append([logits, *tape.gradient(loss, model.trainable_variables)])
    for ours, textbook in zip(*results):
        np.testing.assert_allclose(ours.numpy(), textbook.numpy(), rtol=1e-5, atol=1e-7)
