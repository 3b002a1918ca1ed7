"""The Learner (orbit's "trainer"): model, optimizer, the compiled train step and the evaluator, on one strategy.

Images stay resident on every replica's device; the input pipeline feeds only example indices.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import tensorflow as tf

from trainer import input_pipeline
from trainer.checkpoints import Checkpoints
from trainer.config import Config
from trainer.datasets import Split
from trainer.distribute import multi_worker
from trainer.evaluate import Evaluator
from trainer.loop import Schedule
from trainer.models import build_model
from trainer.optimizers import build_optimizer


class Learner:
    """Everything that runs on the devices, built once inside `strategy.scope()`."""

    def __init__(self, config: Config, strategy: tf.distribute.Strategy, train: Split, test: Split,
                 schedule: Schedule, checkpoint_dir: str) -> None:
        self.config, self.strategy, self.train_split, self.schedule = config, strategy, train, schedule
        keras.utils.set_random_seed(config.run.seed)
        with strategy.scope():
            self.model = build_model(config.model.model, config.runtime.precision)
            self.optimizer = build_optimizer(config.optimizer, schedule.steps_per_epoch, schedule.total_steps,
                                             loss_scaling=config.runtime.precision == "mixed_float16")
            self.optimizer.build(self.model.trainable_variables)
        self.checkpoints = Checkpoints(checkpoint_dir, self.model, self.optimizer)
        self.evaluate = Evaluator(strategy, self.model, test)
        self._resident = input_pipeline.resident_split(strategy, train)
        self._steps = make_train_steps(strategy, self.model, self.optimizer, config.run.batch_size, self._resident,
                                       config.runtime.jit_compile)
        self._iterator: Any = None
        self._chunks: list[int] = []  # the steps of each chunk the iterator holds, in order
        self._learning_rate: tf.Tensor | None = None
        # On several workers, every worker must trace its collectives in the same order, which a thread cannot
        # promise: their evaluation is set up at its first call.
        self._warm_up_evaluation = not multi_worker(strategy)

    def begin(self, start_step: int) -> None:
        """Position the input at `start_step` (the examples already trained on are skipped)."""
        if start_step >= self.schedule.total_steps:
            return  # fully trained (a run stopped before its metrics): only evaluation and export are left
        run, chunks = self.config.run, self.schedule.chunks(start_step)
        dataset = self.strategy.distribute_datasets_from_function(input_pipeline.train_index_fn(
            len(self.train_split), run.batch_size, run.seed, chunks, self.config.data.augment))
        self._iterator = iter(dataset)
        self._chunks = [stop - start for start, stop in reversed(chunks)]

    def train_steps(self, steps: int) -> tuple[float, float]:
        """Run the schedule's next chunk, of `steps` synchronous steps; return the summed loss and the correct
        count over their examples."""
        expected = self._chunks.pop() if self._chunks else None
        if steps != expected:
            raise ValueError(f"the next chunk has {expected} steps, not {steps}")
        count = tf.constant(steps)
        if self._warm_up_evaluation:
            # Trace the train step first, then set up the evaluation in a thread: its tracing (Python) overlaps
            # TensorFlow optimizing and instantiating the train step's graph (C++, on one core) at this first
            # call.
            self._steps.get_concrete_function(self._iterator, count)
            self.evaluate.warm_up_in_background()
            self._warm_up_evaluation = False
        loss_sum, correct, self._learning_rate = self._steps(self._iterator, count)
        return float(loss_sum), float(correct)

    @property
    def learning_rate(self) -> float:
        """The optimizer's current learning rate (after a chunk of steps, the one it returned: no op runs for it)."""
        if self._learning_rate is None:
            return float(tf.convert_to_tensor(self.optimizer.learning_rate))
        return float(self._learning_rate)


def make_train_steps(strategy: tf.distribute.Strategy, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                     global_batch: int, resident: tf.distribute.DistributedValues,
                     jit_compile: bool = False) -> Callable[..., Any]:
    """A tf.function `(iterator, steps) -> (summed loss, correct, learning rate after them)` running `steps`
    synchronous training steps on the iterator's next block of `steps` batches of indices into the
    replica-resident split."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def gradients(images: tf.Tensor, labels: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = loss_fn(labels, logits)
            # Scale by the global batch: gradients summed over replicas give the batch mean.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)  # the loss itself unless float16 loss scaling is on
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1), labels), tf.float32))
        return tape.gradient(scaled, model.trainable_variables), tf.reduce_sum(per_example), correct

    if jit_compile:
        # XLA fuses the forward and backward pass; the update (with its cross-replica all-reduce) stays outside.
        gradients = tf.function(gradients, jit_compile=True)

    def replica_step(split: tuple[tf.Tensor, tf.Tensor], block: dict[str, tf.Tensor], step: tf.Tensor
                     ) -> tuple[tf.Tensor, tf.Tensor]:
        batch = {key: rows[step] for key, rows in block.items()}
        grads, loss_sum, correct = gradients(*input_pipeline.gather_batch(*split, batch))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss_sum, correct

    # The loop is written out, without AutoGraph: nothing here branches on tensors, and AutoGraph's rewrite of
    # this code took ~0.2 s of the first call, on the way to the first step.
    @tf.function(autograph=False)
    def train_steps(iterator: Any, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        block = next(iterator)

        def one_step(step: tf.Tensor, loss_sum: tf.Tensor, correct: tf.Tensor
                     ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            loss, right = strategy.run(replica_step, args=(resident, block, step))
            return (step + 1, loss_sum + strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                    correct + strategy.reduce(tf.distribute.ReduceOp.SUM, right, axis=None))

        _, loss_sum, correct = tf.while_loop(lambda step, *_: step < steps, one_step,
                                             (tf.constant(0), tf.constant(0.0), tf.constant(0.0)))
        # Read here, in the graph: evaluating the schedule eagerly after each chunk took ~10 ms of op dispatch.
        with tf.control_dependencies([loss_sum]):
            return loss_sum, correct, tf.convert_to_tensor(optimizer.learning_rate)

    return train_steps
