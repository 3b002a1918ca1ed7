"""Step-numbered checkpoints of model, optimizer, step and epoch (tf.train.CheckpointManager) in a local folder."""

from __future__ import annotations

import os
import re
from typing import Callable

import keras
import tensorflow as tf

from trainer.config import ConfigError
from trainer.run_dir import KEEP_CHECKPOINTS, POINTER, checkpoint_pointer

POINTER_FILE = os.path.basename(POINTER)
_TF_PREFIX = re.compile(r"\{\{[^}]*\}\}\s*")  # "{{function_node ...}}" before TensorFlow's own message


class Checkpoints:
    """Model, optimizer, global step and epoch under `directory`; the data position is the step."""

    def __init__(self, directory: str, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step, epoch=self.epoch)
        self._directory = directory
        self._manager = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=KEEP_CHECKPOINTS)

    def restore(self, where: str, log: Callable[[str], None]) -> tuple[int, list[str]]:
        """Restore the newest checkpoint that loads, falling back to older kept ones (each one that does not load
        is reported in one warning line); return the step to continue from and the names that did not load."""
        unreadable: list[str] = []
        for path in reversed(self._kept()):
            name = os.path.basename(path)
            try:
                # Every saved object must find its counterpart: a different architecture fails here.
                self._checkpoint.restore(path).assert_existing_objects_matched()
            except (AssertionError, ValueError) as error:
                raise ConfigError(f"checkpoint {name} of {where} does not fit this model "
                                  f"({str(error).splitlines()[0][:160]})") from error
            except tf.errors.OpError as error:  # checksum mismatch, missing or truncated file
                unreadable.append(name)
                reason = _TF_PREFIX.sub("", error.message).splitlines()[0][:240]
                log(f"warning: checkpoint {name} of {where} does not load ({type(error).__name__}: {reason}); "
                    "trying an older one")
                continue
            if unreadable:
                self._forget(path)
            return int(self.step.numpy()), unreadable
        if unreadable:
            raise ConfigError(f"no checkpoint of {where} loads ({', '.join(unreadable)}: all damaged); "
                              "remove its checkpoints/ to train it again from the start")
        return 0, unreadable

    def _kept(self) -> list[str]:
        """The paths the checkpoint state file names, oldest first, the latest last. (Not the manager's own list:
        it leaves out checkpoints whose state has no timestamps, as a pointer restored from the store.)"""
        state = tf.train.get_checkpoint_state(self._directory)
        if state is None or not state.model_checkpoint_path:
            return []
        paths = [p for p in state.all_model_checkpoint_paths if p != state.model_checkpoint_path]
        return paths + [state.model_checkpoint_path]

    def _forget(self, restored: str) -> None:
        """Make `restored` the newest checkpoint: the damaged newer ones are deleted, so that the manager never
        keeps or rotates a file saved again under the same number."""
        checkpoints = self._kept()  # oldest first; every one after `restored` failed to load
        kept = checkpoints[: checkpoints.index(restored) + 1]
        for path in checkpoints[len(kept):]:
            for file in tf.io.gfile.glob(f"{path}.*"):
                tf.io.gfile.remove(file)
        with open(os.path.join(self._directory, POINTER_FILE), "wb") as f:
            f.write(checkpoint_pointer(os.path.basename(restored), [os.path.basename(p) for p in kept]))
        self._manager = tf.train.CheckpointManager(self._checkpoint, self._directory, max_to_keep=KEEP_CHECKPOINTS)

    def save(self, step: int, epoch: int) -> str:
        """Record step and epoch and write a checkpoint numbered by step."""
        self.step.assign(step)
        self.epoch.assign(epoch)
        return self._manager.save(checkpoint_number=step)
