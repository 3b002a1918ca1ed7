"""The GPU-path options, exercised on two logical CPU replicas: float16 mixed precision with loss
scaling, XLA-compiled forward/backward, and learning-rate warm-up and batch scaling."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import input_pipeline
from trainer.config import OptimizerConfig, RuntimeConfig, build_config
from trainer.datasets import Split
from trainer.distribute import make_strategy
from trainer.learner import make_train_steps
from trainer.models import build_model
from trainer.optimizers import build_optimizer, learning_rate_schedule

BATCH = 128


def _train(mnist: dict, model_name: str, precision: str, jit_compile: bool, optimizer: str,
           steps: int) -> tuple[keras.Model, keras.optimizers.Optimizer, float, float]:
    """`steps` steps on real MNIST digits; returns the model, optimiser, summed loss and accuracy."""
    train = mnist["train"]
    split = Split(train.images[: steps * BATCH], train.labels[: steps * BATCH], train.source)
    strategy = make_strategy(RuntimeConfig(cpu_replicas=2))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(model_name, precision)
        config = OptimizerConfig(optimizer=optimizer, learning_rate=0.01 if optimizer == "adam" else 0.1)
        optimizer_ = build_optimizer(config, steps, steps, loss_scaling=precision == "mixed_float16")
        optimizer_.build(model.trainable_variables)
    dataset = strategy.distribute_datasets_from_function(
        input_pipeline.train_index_fn(len(split), BATCH, 0, [(0, steps)]))
    train_steps = make_train_steps(strategy, model, optimizer_, BATCH, input_pipeline.resident_split(strategy, split),
                                   jit_compile)
    loss_sum, correct, _ = train_steps(iter(dataset), tf.constant(steps))
    return model, optimizer_, float(loss_sum), float(correct) / (steps * BATCH)


def test_mixed_float16_computes_in_float16_keeps_float32_weights_and_learns(mnist: dict) -> None:
    model, optimizer, _, accuracy = _train(mnist, "lenet_bn", "mixed_float16", False, "adam", 60)
    _, _, _, float32_accuracy = _train(mnist, "lenet_bn", "float32", False, "adam", 60)
    assert model.get_layer("conv2").compute_dtype == "float16"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert optimizer.dynamic_scale.numpy() > 1  # the loss really was scaled
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left as it was
    assert accuracy > 0.7 and abs(accuracy - float32_accuracy) < 0.03, (accuracy, float32_accuracy)


def test_xla_compiled_step_matches_the_plain_step(mnist: dict) -> None:
    plain, _, plain_loss, _ = _train(mnist, "cnn", "float32", False, "sgd", 3)
    xla, _, xla_loss, _ = _train(mnist, "cnn", "float32", True, "sgd", 3)
    assert xla_loss == pytest.approx(plain_loss, rel=1e-4)
    for a, b in zip(plain.trainable_variables, xla.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5)


def test_warmup_then_cosine_or_constant() -> None:
    cosine = learning_rate_schedule(OptimizerConfig(learning_rate=0.01, schedule="cosine", warmup_epochs=0.5), 100, 300)
    assert [round(float(cosine(s)), 6) for s in (0, 25, 50, 300)] == [0.0, 0.005, 0.01, 0.0]
    constant = learning_rate_schedule(OptimizerConfig(learning_rate=0.01, warmup_epochs=1.0), 100, 300)
    assert [round(float(constant(s)), 6) for s in (0, 50, 100, 299)] == [0.0, 0.005, 0.01, 0.01]
    assert learning_rate_schedule(OptimizerConfig(learning_rate=0.01), 100, 300) == 0.01


@pytest.mark.parametrize("rule, batch, rate", [("none", 512, 0.03), ("linear", 512, 0.12), ("sqrt", 512, 0.06),
                                               ("linear", 128, 0.03)])
def test_learning_rate_scales_with_the_batch_relative_to_the_preset(rule: str, batch: int, rate: float) -> None:
    config = build_config({"model": "lenet_bn", "batch_size": batch, "lr_scaling": rule})  # preset: 0.03 at 128
    assert config.optimizer.learning_rate == pytest.approx(rate)
