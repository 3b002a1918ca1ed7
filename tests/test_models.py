"""Model registry: parameter counts of the reference architectures."""

from __future__ import annotations

import numpy as np
import pytest

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
