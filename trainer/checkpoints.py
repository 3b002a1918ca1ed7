"""Step-numbered checkpoints of model, optimizer, step and epoch (tf.train.CheckpointManager) in a local folder."""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.config import ConfigError
from trainer.run_dir import KEEP_CHECKPOINTS


class Checkpoints:
    """Model, optimizer, global step and epoch under `directory`; the data position is the step."""

    def __init__(self, directory: str, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step, epoch=self.epoch)
        self._manager = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=KEEP_CHECKPOINTS)

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest checkpoint, or None."""
        return self._manager.latest_checkpoint

    def restore(self) -> int:
        """Restore the newest checkpoint if there is one; return the step to continue from."""
        if self.latest is None:
            return 0
        try:
            # Every saved object must find its counterpart: a different architecture fails here.
            self._checkpoint.restore(self.latest).assert_existing_objects_matched()
        except AssertionError as error:
            raise ConfigError(f"checkpoint {self.latest} does not fit this model") from error
        return int(self.step.numpy())

    def save(self, step: int, epoch: int) -> str:
        """Record step and epoch and write a checkpoint numbered by step."""
        self.step.assign(step)
        self.epoch.assign(epoch)
        return self._manager.save(checkpoint_number=step)
