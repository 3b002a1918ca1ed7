"""Test-set metrics (loss, accuracy, confusion matrix, per-class precision and recall) of the live model on a
strategy, or of an exported serving signature."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from trainer.datasets import NUM_CLASSES, Split
from trainer.input_pipeline import resident_split


def summarize(confusion: np.ndarray, loss_sum: float) -> dict[str, Any]:
    """Metrics from a confusion matrix (rows = true label) and the summed per-example loss."""
    confusion = np.asarray(confusion, dtype=np.int64)
    total = int(confusion.sum())
    correct = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, correct / predicted, 0.0)
        recall = np.where(actual > 0, correct / actual, 0.0)
    return {
        "test_accuracy": float(correct.sum() / total),
        "test_loss": float(loss_sum / total),
        "test_examples": total,
        "confusion_matrix": confusion.tolist(),
        "precision": [round(float(p), 6) for p in precision],
        "recall": [round(float(r), 6) for r in recall],
    }


def _batch_stats(logits: tf.Tensor, labels: tf.Tensor, counted: tf.Tensor | None = None
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    predictions = tf.argmax(logits, axis=-1)
    weights = None if counted is None else tf.cast(counted, tf.int64)
    confusion = tf.math.confusion_matrix(labels, predictions, num_classes=NUM_CLASSES, weights=weights,
                                         dtype=tf.int64)
    if counted is not None:
        per_example *= tf.cast(counted, per_example.dtype)
    return tf.reduce_sum(per_example), confusion


PROBABILITY_FLOOR = 1e-12  # log(probability) of an exported model's outputs stays finite
EVAL_BATCH = 500  # examples per replica and batch: evaluation needs no gradients, so large batches, few of them


class Evaluator:
    """Evaluates the live model on every example of a split, each replica taking a share of each batch; the
    whole pass is one tf.function call, traced and set up once (`warm_up_in_background` can do that while
    training runs)."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, split: Split) -> None:
        # The split stays on the devices, as in training, and each replica slices its share of each batch out of
        # it: no input pipeline (a tf.data pipeline of index batches cost an iterator per pass and a function
        # call per batch, and passes took 0.21-0.64 s where the slicing loop takes ~0.2 s; a dataset holding
        # the images would put them into the graph as constants, about a second at the first call).
        resident = resident_split(strategy, split)
        replicas, num_examples = strategy.num_replicas_in_sync, len(split)
        self._batches = -(-num_examples // (EVAL_BATCH * replicas))  # global batches of the whole split
        window = min(EVAL_BATCH, num_examples)
        sum_ = tf.distribute.ReduceOp.SUM

        def replica_stats(images_labels: tuple[tf.Tensor, tf.Tensor], batch: tf.Tensor
                          ) -> tuple[tf.Tensor, tf.Tensor]:
            # Replica r counts rows [r * EVAL_BATCH, (r + 1) * EVAL_BATCH) of global batch `batch`: fewer, or
            # none, at the split's end, so every example counts once whatever the number of replicas. The model
            # always sees `window` rows, the window moved back to end at the split's end where it must (the
            # rows it then repeats are not counted): one static shape, and no empty batch, which oneDNN's
            # convolutions reject.
            replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)
            start = tf.minimum((batch * replicas + replica) * EVAL_BATCH, num_examples)
            stop = tf.minimum(start + EVAL_BATCH, num_examples)
            first = tf.minimum(start, num_examples - window)
            rows = first + tf.range(window)
            images, labels = images_labels
            return _batch_stats(model(images[first:first + window], training=False), labels[first:first + window],
                                (rows >= start) & (rows < stop))

        def add_batch(batch: tf.Tensor, loss_sum: tf.Tensor, confusion: tf.Tensor
                      ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            loss, matrix = strategy.run(replica_stats, args=(resident, batch))
            return (batch + 1, loss_sum + strategy.reduce(sum_, loss, axis=None),
                    confusion + strategy.reduce(sum_, matrix, axis=None))

        # No AutoGraph (as for the train steps): the loop is written out.
        @tf.function(autograph=False)
        def evaluate_all(batches: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            _, loss_sum, confusion = tf.while_loop(
                lambda batch, *_: batch < batches, add_batch,
                (tf.constant(0), tf.constant(0.0), tf.zeros((NUM_CLASSES, NUM_CLASSES), tf.int64)))
            return loss_sum, confusion

        self._evaluate_all = evaluate_all
        self._warmer: threading.Thread | None = None

    def warm_up_in_background(self) -> None:
        """Trace and set up the pass in a thread (about a second that would otherwise delay the first evaluation):
        it overlaps the training steps, which run in TensorFlow's own threads."""
        if self._warmer is None:
            # Not a daemon: the interpreter's exit waits for it (a daemon thread still in TensorFlow's C++ code
            # at exit aborts the process).
            self._warmer = threading.Thread(target=self._warm_up, name="warm-up-evaluation")
            self._warmer.start()

    def _warm_up(self) -> None:
        # Tracing is half of the first call's cost; TensorFlow optimizing and instantiating the graph at its first
        # run is the other half. A pass over no batches does both and runs no op of the loop's body: no model op
        # competes with the training step, and no collective races its collectives.
        # A failure here is left to the first real call, which reports it.
        with contextlib.suppress(Exception):
            self._evaluate_all(tf.constant(0))

    def __call__(self) -> dict[str, Any]:
        if self._warmer is not None:
            self._warmer.join()
        loss_sum, confusion = self._evaluate_all(tf.constant(self._batches))
        return summarize(confusion.numpy(), float(loss_sum))


def evaluate_serving(serve: Callable[..., dict[str, tf.Tensor]], split: Split,
                     batch: int = EVAL_BATCH) -> dict[str, Any]:
    """Evaluate an exported `serving_default` signature on raw uint8 images."""

    def stats(images: np.ndarray, labels: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
        probabilities = serve(images=tf.constant(images))["probabilities"]
        return _batch_stats(tf.math.log(tf.maximum(probabilities, PROBABILITY_FLOOR)), tf.constant(labels))

    return _accumulate(
        stats(split.images[i : i + batch], split.labels[i : i + batch]) for i in range(0, len(split), batch)
    )


def _accumulate(results: Any) -> dict[str, Any]:
    loss_sum, confusion = 0.0, np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for loss, matrix in results:
        loss_sum += float(loss)
        confusion += matrix.numpy()
    return summarize(confusion, loss_sum)
