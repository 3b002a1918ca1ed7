"""Process-wide TensorFlow settings, applied by the entry point before TensorFlow is imported, and loading
TensorFlow quietly: its start-up chatter is held back unless --verbose (or unless loading fails)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import warnings
from typing import Iterator

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
# Python-side notices with nothing for a user to do: tf.data's note on options in graph mode (raised by
# distribute_datasets_from_function itself), and absl/TensorFlow/TFDS warnings such as a TFDS variant folder
# without dataset_info.json (TFDS probing a data dir that holds only our IDX files).
_QUIET_WARNINGS = ("To make it possible to preserve tf.data options",)
_QUIET_LOGGERS = ("absl", "tensorflow")


def set_tensorflow_env(verbose: bool = False) -> None:
    """Set TF_ENV_DEFAULTS for this process unless the user set them (verbose: all C++ logs); call before
    importing TensorFlow."""
    for name, value in TF_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[None]:
    """Hold back what native code writes to file descriptor 2 (shown again if the block fails)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _matplotlib_hidden() -> Iterator[None]:
    """Make matplotlib unimportable inside the block (a None entry in sys.modules), if nothing imported it yet.

    Keras imports matplotlib.pyplot at start-up when it is installed, for a plotting helper we never call:
    ~0.8 s of every process start (a fifth of importing TensorFlow). Our analyses import it themselves, later.
    """
    hidden = [name for name in ("matplotlib", "matplotlib.pyplot") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, "") is None:
                del sys.modules[name]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection inside the block; afterwards, everything alive is frozen out of later collections.

    Importing TensorFlow allocates millions of long-lived objects: the cyclic collector ran ~640 times during the
    import (~0.5 s of ~3.4 s) and every full collection after it rescanned them all (~0.2 s each). Freezing them
    (gc.freeze, made for long-lived start-up objects) leaves later collections only what the run itself makes.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.freeze()


def load_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow and probe its devices. Its C++ start-up lines (oneDNN and CUDA notices, a failed cuInit
    on a machine without a GPU) are written before TF_CPP_MIN_LOG_LEVEL applies; they are held back, and the
    Python-side notices above silenced, unless `verbose`."""
    if not verbose:
        for message in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    with _collector_paused(), _matplotlib_hidden(), (contextlib.nullcontext() if verbose else _native_stderr_held()):
        import tensorflow as tf

        tf.config.list_physical_devices()
