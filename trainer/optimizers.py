"""build_optimizer(config) -> Keras optimiser; Adam's update runs as TensorFlow's fused kernel."""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.config import OptimizerConfig


class FusedAdam(keras.optimizers.Adam):
    """keras.optimizers.Adam (same variables, same checkpoints, same maths) updating each variable
    with one ResourceApplyAdam kernel instead of a dozen element-wise ops (~3x faster on CPU)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.amsgrad:
            raise ValueError("FusedAdam does not implement amsgrad")

    def update_step(self, gradient: tf.Tensor, variable: tf.Variable, learning_rate: tf.Tensor) -> None:
        """Apply one Adam step to `variable` (called by apply_gradients, inside strategy updates)."""
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )


def learning_rate_schedule(config: OptimizerConfig, steps_per_epoch: int,
                           total_steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 over `warmup_epochs`, then the rate held constant or cosine-decayed to 0."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if not warmup and config.schedule == "constant":
        return config.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else config.learning_rate,
        decay_steps=max(1, total_steps - warmup),
        alpha=1.0 if config.schedule == "constant" else 0.0,  # alpha=1: no decay after the warm-up
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def build_optimizer(config: OptimizerConfig, steps_per_epoch: int, total_steps: int,
                    loss_scaling: bool = False) -> keras.optimizers.Optimizer:
    """The configured optimiser (SGD with momentum or FusedAdam) on its learning-rate schedule,
    wrapped in dynamic loss scaling for float16 training."""
    rate = learning_rate_schedule(config, steps_per_epoch, total_steps)
    if config.optimizer == "sgd":
        optimizer: keras.optimizers.Optimizer = keras.optimizers.SGD(rate, momentum=config.momentum)
    else:
        optimizer = FusedAdam(rate)
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer
