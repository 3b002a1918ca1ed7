"""make_strategy(runtime config) -> tf.distribute.Strategy, created once and passed down."""

from __future__ import annotations

import tensorflow as tf

from trainer.config import ConfigError, RuntimeConfig


def split_cpu(replicas: int) -> None:
    """Split the physical CPU into `replicas` logical devices (before TensorFlow initialises them)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) >= replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
        )
    except RuntimeError as error:  # devices were already initialised with fewer CPUs
        raise ConfigError(f"cannot split the CPU into {replicas} devices after TensorFlow started: {error}")


def make_strategy(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    """MirroredStrategy over all visible GPUs (or the CPU), or over N logical CPUs if asked."""
    if runtime.cpu_replicas:
        split_cpu(runtime.cpu_replicas)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][: runtime.cpu_replicas]
        return tf.distribute.MirroredStrategy(devices=devices)
    # With no arguments MirroredStrategy takes every visible GPU, or the CPU when there is none.
    return tf.distribute.MirroredStrategy()


def describe(strategy: tf.distribute.Strategy) -> str:
    """Short name such as 'MirroredStrategy'."""
    return type(strategy).__name__
