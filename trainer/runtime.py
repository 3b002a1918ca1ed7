"""Process-wide TensorFlow settings, applied by the entry point before TensorFlow is imported."""

from __future__ import annotations

import os

TF_ENV_DEFAULTS = {
    # Keep TensorFlow's C++ chatter out of the logs, errors included: each error that matters comes back as
    # a Python exception we report in one line, and a lost peer makes every survivor log its abort twice.
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX.
    # Elsewhere (e.g. AMD EPYC) the Eigen fallbacks make a training step ~1.5x slower (make bench).
    # GPU kernels are not affected.
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # By default TensorFlow rebuilds (JIT-compiles) the oneDNN conv filter-gradient primitive at every
    # step to save its scratch memory; caching it about halves that kernel's time (a cnn step: ~5% faster).
    "TF_MKL_OPTIMIZE_PRIMITIVE_MEMUSE": "false",
}


def set_tensorflow_env() -> None:
    """Set TF_ENV_DEFAULTS for this process unless the user set them; call before importing TensorFlow."""
    for name, value in TF_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
