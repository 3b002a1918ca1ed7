"""Forward FLOPs per image of a preset's model (TensorFlow's profiler on the frozen graph), as JSON.

Usage: python -m bench.references.model_flops [MODEL]  (default cnn)
"""

from __future__ import annotations

import json
import sys

import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from trainer.models import build_model


def main() -> None:
    """Profile one forward pass and print its float operations."""
    model = build_model(sys.argv[1] if len(sys.argv) > 1 else "cnn")
    forward = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, 28, 28, 1), tf.uint8))
    graph = convert_variables_to_constants_v2(forward).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    flops = tf.compat.v1.profiler.profile(graph, options=options).total_float_ops
    print(json.dumps({"forward_flops_per_image": flops}))


if __name__ == "__main__":
    main()
