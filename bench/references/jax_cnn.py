"""JAX peer, run in its own virtual environment (bench/peers.py makes it): the cnn preset's model (conv 32 3x3,
max-pool 2x2, ReLU, dense 128, dense 10: 693,962 parameters) or the lenet_bn recipe, with optax's Adam, on the
project's verified MNIST IDX files, written as JAX's guidance has it: the split on the device once, one jitted
step per call that gathers its batch there, buffers donated. (A multi-step loop inside one jit was about 10x
slower for such convolutions on CPUs, jax-ml/jax#12868.) Prints one JSON line per result.

Usage: python -m bench.references.jax_cnn throughput DATA_DIR BATCH WARMUP TIMED
       python -m bench.references.jax_cnn accuracy DATA_DIR SEED
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.references import lenet_bn_recipe, report_evaluation
from trainer.datasets import idx_dir, read_idx_split, verify

Params = dict[str, Any]


def load(data_dir: str, split: str) -> tuple[jax.Array, jax.Array]:
    """A verified split on the device: uint8 NHWC images, int32 labels."""
    images, labels = read_idx_split(idx_dir(data_dir, "mnist"), split)
    verify("mnist", split, images, labels)
    return jax.device_put(images), jax.device_put(labels.astype(np.int32))


def _glorot(key: jax.Array, shape: tuple[int, ...], fan_in: int, fan_out: int) -> jax.Array:
    limit = np.sqrt(6 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit)


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _pool_relu(x: jax.Array, bias: jax.Array | float = 0.0) -> jax.Array:
    # The conv's bias after the pool, as the trainer's models have it: the same function, less work.
    pooled = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jax.nn.relu(pooled + bias)


def cnn_init(key: jax.Array) -> Params:
    """The cnn preset's parameters, Keras' default initialisers."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"conv": _glorot(k1, (3, 3, 1, 32), 9, 9 * 32), "conv_b": jnp.zeros(32),
            "hidden": _glorot(k2, (5408, 128), 5408, 128), "hidden_b": jnp.zeros(128),
            "logits": _glorot(k3, (128, 10), 128, 10), "logits_b": jnp.zeros(10)}


def cnn_apply(params: Params, state: Params, images: jax.Array, train: bool) -> tuple[jax.Array, Params]:
    """Logits of uint8 images; the cnn has no state."""
    x = images.astype(jnp.float32) / 255
    x = _pool_relu(_conv(x, params["conv"]), params["conv_b"])
    x = jax.nn.relu(x.reshape(len(x), -1) @ params["hidden"] + params["hidden_b"])
    return x @ params["logits"] + params["logits_b"], state


def lenet_init(key: jax.Array) -> tuple[Params, Params]:
    """The lenet_bn preset's parameters and batch-norm statistics: 80,298 parameters in all."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {"conv1": _glorot(k1, (5, 5, 1, 16), 25, 25 * 16), "conv1_b": jnp.zeros(16),
              "conv2": _glorot(k2, (5, 5, 16, 32), 400, 800), "bn_scale": jnp.ones(32), "bn_bias": jnp.zeros(32),
              "hidden": _glorot(k3, (512, 128), 512, 128), "hidden_b": jnp.zeros(128),
              "logits": _glorot(k4, (128, 10), 128, 10), "logits_b": jnp.zeros(10)}
    return params, {"mean": jnp.zeros(32), "var": jnp.ones(32)}


def lenet_apply(params: Params, state: Params, images: jax.Array, train: bool) -> tuple[jax.Array, Params]:
    """Logits of uint8 images, and the batch-norm statistics (moving averages, momentum 0.99, as Keras)."""
    x = images.astype(jnp.float32) / 255
    x = _pool_relu(_conv(x, params["conv1"]), params["conv1_b"])
    x = _conv(x, params["conv2"])
    if train:
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        state = {"mean": 0.99 * state["mean"] + 0.01 * mean, "var": 0.99 * state["var"] + 0.01 * var}
    else:
        mean, var = state["mean"], state["var"]
    x = (x - mean) * jax.lax.rsqrt(var + 1e-3) * params["bn_scale"] + params["bn_bias"]
    x = _pool_relu(x)
    x = jax.nn.relu(x.reshape(len(x), -1) @ params["hidden"] + params["hidden_b"])
    return x @ params["logits"] + params["logits_b"], state


def make_step(apply: Callable, optimizer: optax.GradientTransformation, batch: int) -> Callable:
    """A jitted step that gathers batch `i` of `order` from the device-resident split and applies Adam."""

    def loss_fn(params: Params, state: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Params]:
        logits, state = apply(params, state, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, state, opt_state, images, labels, order, i):
        index = jax.lax.dynamic_slice_in_dim(order, i * batch, batch)
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, images[index],
                                                                        labels[index])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return step


def throughput(data_dir: str, batch: int, warmup: int, timed: int) -> dict:
    """Examples/sec of the cnn model at `batch`, timed over `timed` steps after `warmup`."""
    images, labels = load(data_dir, "train")
    params, state = cnn_init(jax.random.key(0)), {}
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == 693_962
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    step = make_step(cnn_apply, optimizer, batch)
    order = jax.random.permutation(jax.random.key(1), len(labels))
    batches = len(labels) // batch
    for i in range(warmup + timed):
        if i == warmup:
            jax.block_until_ready(params)
            start = time.perf_counter()
        params, state, opt_state, loss = step(params, state, opt_state, images, labels, order, i % batches)
    jax.block_until_ready(params)
    return {"examples_per_sec": timed * batch / (time.perf_counter() - start)}


def accuracy(data_dir: str, seed: int) -> None:
    """The lenet_bn recipe (the trainer's preset: Adam, linear warm-up then cosine decay, its batch, 1 epoch);
    prints the test accuracy with the wall time of its evaluation."""
    images, labels = load(data_dir, "train")
    test_images, test_labels = load(data_dir, "test")
    batch, lr, steps, warmup = lenet_bn_recipe(len(labels))
    params, state = lenet_init(jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    step = make_step(lenet_apply, optimizer, batch)
    order = jax.random.permutation(jax.random.key(seed + 1), len(labels))
    for i in range(steps):
        params, state, opt_state, _ = step(params, state, opt_state, images, labels, order, i)
    predict = jax.jit(lambda p, s, x: lenet_apply(p, s, x, False)[0].argmax(-1))
    correct = sum(int((predict(params, state, test_images[i:i + 1000]) == test_labels[i:i + 1000]).sum())
                  for i in range(0, len(test_labels), 1000))
    report_evaluation(1, correct / len(test_labels))


def main() -> None:
    """Parse the mode and run it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("throughput", "accuracy"))
    parser.add_argument("data_dir")
    parser.add_argument("numbers", type=int, nargs="+")
    args = parser.parse_args()
    if args.mode == "throughput":
        print(json.dumps(throughput(args.data_dir, *args.numbers)))
    else:
        accuracy(args.data_dir, *args.numbers)


if __name__ == "__main__":
    main()
