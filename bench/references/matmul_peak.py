"""This machine's float32 matmul peak in FLOP/s: the best of 5 rounds of 5 2048x2048 matmuls, as JSON."""

from __future__ import annotations

import json
import time

import tensorflow as tf

N = 2048


def main() -> None:
    """Time the matmuls and print the best rate."""
    a, b = tf.random.normal((N, N)), tf.random.normal((N, N))
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    matmul().numpy()
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            out = matmul()
        out.numpy()
        best = max(best, 5 * 2 * N ** 3 / (time.perf_counter() - start))
    print(json.dumps({"peak_flops": best}))


if __name__ == "__main__":
    main()
