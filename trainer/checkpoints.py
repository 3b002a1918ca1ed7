"""Step-based checkpoints (tf.train.CheckpointManager), restore-on-start and the SIGTERM flag."""

from __future__ import annotations

import signal
import threading
import time
import types

import keras
import tensorflow as tf


class Checkpoints:
    """Model, optimizer, global step and epoch under `directory`; the data position is the step."""

    def __init__(self, directory: str, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 max_to_keep: int = 3) -> None:
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step, epoch=self.epoch)
        self._manager = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=max_to_keep)

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest checkpoint, or None."""
        return self._manager.latest_checkpoint

    def restore(self) -> int:
        """Restore the newest checkpoint if there is one; return the step to continue from."""
        if self.latest is None:
            return 0
        # Every saved object must find its counterpart: a different architecture fails here.
        self._checkpoint.restore(self.latest).assert_existing_objects_matched()
        return int(self.step.numpy())

    def save(self, step: int, epoch: int) -> str:
        """Record step and epoch and write a checkpoint numbered by step."""
        self.step.assign(step)
        self.epoch.assign(epoch)
        return self._manager.save(checkpoint_number=step)


class StopSignal:
    """Turns SIGTERM (Kubernetes preemption or delete) into a flag the loop checks between chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: signal.Handlers | None = None
        self._received_at = 0.0

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self._received_at = time.monotonic()
        self._event.set()

    def remaining(self, grace: float) -> float:
        """Seconds left of a `grace`-second budget that started when SIGTERM arrived."""
        return max(0.0, grace - (time.monotonic() - self._received_at))

    @property
    def requested(self) -> bool:
        """True once SIGTERM has arrived."""
        return self._event.is_set()
