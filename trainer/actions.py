"""The loop's actions, in the order train.py runs them: summaries, end-of-epoch evaluation (and the run's
history), checkpoint-and-ship, and, at the end, export. (Stopping on SIGTERM is preemption.Preemption.)"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any, Callable

import keras
import tensorflow as tf
from tqdm import tqdm

from trainer.checkpoints import Checkpoints
from trainer.export import export_model
from trainer.loop import Progress, crossed
from trainer.shipper import Shipper


def accuracy_text(value: float) -> str:
    """The one format of an accuracy in what the trainer prints: 92.56%."""
    return f"{value:.2%}"


class Console:
    """Progress on stderr (the chief's only): a live bar in a terminal; in a log file, plain whole lines."""

    def __init__(self, total: int, initial: int, show: bool, log_every: float) -> None:
        self.total, self.show, self.initial, self.log_every = total, show, initial, log_every
        self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5) if show and sys.stderr.isatty() else None
        self._started = self._last = time.monotonic()

    def update(self, step: int, loss: float, accuracy: float) -> None:
        """Training reached `step` with this chunk's loss and accuracy."""
        text = f"loss {loss:.4f}  accuracy {accuracy_text(accuracy)}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        now = time.monotonic()
        if not self.show or (now - self._last < self.log_every and step < self.total):
            return
        self._last = now
        rate = (step - self.initial) / max(now - self._started, 1e-9)
        eta = datetime.timedelta(seconds=round((self.total - step) / rate)) if rate > 0 else "?"
        print(f"step {step}/{self.total} ({step / self.total:.0%})  {text}  {rate:.0f} steps/s  eta {eta}",
              file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        """A line of its own (above the bar in a terminal)."""
        if not self.show:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the bar."""
        if self.bar is not None:
            self.bar.close()


def summary_writer(logdir: str, chief: bool) -> tf.summary.SummaryWriter:
    """A TensorBoard writer on the chief; a writer that discards everything on other workers."""
    return tf.summary.create_file_writer(logdir) if chief else tf.summary.create_noop_writer()


def write_scalars(writer: tf.summary.SummaryWriter, step: int, **values: float) -> None:
    """One TensorBoard scalar per keyword at `step`."""
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.scalar(name, value)


class Summaries:
    """After every chunk: training scalars to TensorBoard and the progress bar; timings for the throughput."""

    def __init__(self, writer: tf.summary.SummaryWriter, learning_rate: Callable[[], float], console: Console) -> None:
        self.writer, self.learning_rate, self.console = writer, learning_rate, console
        self.timings: list[tuple[int, float]] = []  # (examples, seconds) per chunk

    def __call__(self, p: Progress) -> None:
        self.timings.append((p.examples, p.seconds))
        write_scalars(self.writer, p.step, loss=p.loss, accuracy=p.accuracy, learning_rate=self.learning_rate(),
                      examples_per_sec=p.examples / p.seconds)
        self.console.update(p.step, p.loss, p.accuracy)

    def finish(self, step: int) -> None:
        self.writer.close()

    def examples_per_sec(self) -> float | None:
        """Training examples per second, leaving out the first chunk (it includes tracing) when possible."""
        timed = self.timings[1:] or self.timings
        seconds = sum(t for _, t in timed)
        return round(sum(n for n, _ in timed) / seconds, 1) if seconds else None


class Evaluation:
    """At each epoch's end: test metrics to TensorBoard, the console and the run's per-epoch history."""

    def __init__(self, evaluate: Callable[[], dict[str, Any]], writer: tf.summary.SummaryWriter, console: Console,
                 epochs: int, history: list[dict[str, Any]],
                 record: Callable[[list[dict[str, Any]]], None] | None) -> None:
        self.evaluate, self.writer, self.console, self.epochs = evaluate, writer, console, epochs
        self.history, self.record = history, record
        self.last: dict[str, Any] | None = None  # the evaluation at `last_step`
        self.last_step = -1
        self._loss = self._correct = 0.0
        self._examples = 0

    def __call__(self, p: Progress) -> None:
        self._loss, self._correct, self._examples = (
            self._loss + p.loss_sum, self._correct + p.correct, self._examples + p.examples)
        if not p.epoch_end:
            return
        result = self._evaluate(p.step)
        write_scalars(self.writer, p.step, loss=result["test_loss"], accuracy=result["test_accuracy"],
                      accuracy_percent=100 * result["test_accuracy"])  # the HParams table's metric
        self.console.write(f"epoch {p.epoch}/{self.epochs}: test accuracy {accuracy_text(result['test_accuracy'])}  "
                           f"test loss {result['test_loss']:.4f}")
        self.history.append({
            "epoch": p.epoch, "step": p.step,
            "train_loss": round(self._loss / self._examples, 6),
            "train_accuracy": round(self._correct / self._examples, 6),
            "test_loss": round(result["test_loss"], 6), "test_accuracy": round(result["test_accuracy"], 6)})
        self._loss = self._correct = 0.0
        self._examples = 0
        if self.record is not None:
            self.record(self.history)

    def _evaluate(self, step: int) -> dict[str, Any]:
        self.last, self.last_step = self.evaluate(), step
        return self.last

    def finish(self, step: int) -> None:
        if self.last_step != step:  # nothing was left to train: evaluate what was restored
            self._evaluate(step)
        self.writer.close()


class Checkpointing:
    """At each epoch's end and every `every` steps: save a checkpoint and hand it to the shipper (on the chief)."""

    def __init__(self, checkpoints: Checkpoints, every: int, shipper: Shipper | None,
                 flush: Callable[[], None]) -> None:
        self.checkpoints, self.every, self.shipper, self.flush = checkpoints, every, shipper, flush
        self.saved_step = -1

    def __call__(self, p: Progress) -> None:
        if p.epoch_end or crossed(p.previous, p.step, self.every):
            self.save(p.step, p.epoch)

    def save(self, step: int, epoch: int) -> None:
        """Save now (TensorBoard files first, so they are as new as the checkpoint) and queue it for the store."""
        self.flush()
        path = self.checkpoints.save(step, epoch)
        if self.shipper is not None:
            self.shipper.ship_checkpoint(path)
        self.saved_step = step

    def finish(self, step: int) -> None:
        pass


class Export:
    """After the last step: the SavedModel with its uint8 serving signature, unless SIGTERM has arrived (an
    export can outlast the grace period on a loaded node; the re-run of the trained run exports it)."""

    def __init__(self, model: keras.Model, path: str, stopping: Callable[[], bool]) -> None:
        self.model, self.path, self.stopping = model, path, stopping

    def __call__(self, p: Progress) -> None:
        pass

    def finish(self, step: int) -> None:
        if not self.stopping():
            export_model(self.model, self.path)
