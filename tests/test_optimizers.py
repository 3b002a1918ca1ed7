"""FusedAdam must be keras.optimizers.Adam, only faster: same updates, same variables."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import OptimizerConfig, RuntimeConfig
from trainer.distribute import make_strategy
from trainer.optimizers import FusedAdam, build_optimizer


def _train(optimizer_class: type, strategy: tf.distribute.Strategy) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(0)
    gradients = [[rng.normal(size=shape).astype(np.float32) for shape in ((5, 3), (3,))] for _ in range(6)]
    with strategy.scope():
        variables = [tf.Variable(np.ones((5, 3), np.float32)), tf.Variable(np.zeros(3, np.float32))]
        schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=6)
        optimizer = optimizer_class(schedule, beta_1=0.8, beta_2=0.95, epsilon=1e-6)
        optimizer.build(variables)

    @tf.function
    def step(grads: list[tf.Tensor]) -> None:
        # Each replica contributes half, as with compute_average_loss over two replicas.
        scale = 1.0 / strategy.num_replicas_in_sync
        strategy.run(lambda: optimizer.apply_gradients(zip([g * scale for g in grads], variables)))

    for grads in gradients:
        step([tf.constant(g) for g in grads])
    return [v.numpy() for v in variables], [v.path.split("/", 1)[1] for v in optimizer.variables]


@pytest.mark.parametrize("replicas", [1, 2])
def test_fused_adam_matches_keras_adam(replicas: int) -> None:
    strategy = make_strategy(RuntimeConfig(cpu_replicas=replicas))
    fused, fused_slots = _train(FusedAdam, strategy)
    reference, reference_slots = _train(keras.optimizers.Adam, strategy)
    assert fused_slots == reference_slots  # checkpoints are interchangeable
    for a, b in zip(fused, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(fused[0], 1.0)  # the variables did move


def test_build_optimizer_kinds() -> None:
    assert isinstance(build_optimizer(OptimizerConfig(optimizer="adam"), 10, 10), FusedAdam)
    sgd = build_optimizer(OptimizerConfig(optimizer="sgd", momentum=0.9, schedule="cosine"), 10, 10)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
    scaled = build_optimizer(OptimizerConfig(), 10, 10, loss_scaling=True)
    assert isinstance(scaled, keras.optimizers.LossScaleOptimizer) and isinstance(scaled.inner_optimizer, FusedAdam)
