"""The outer training loop: run a chunk of steps, then the ordered actions (as orbit's Controller does).

`Schedule` turns the run's durations (epochs, steps per call, checkpoint interval) into steps; `crossed` is
the one predicate for "an every-N-steps boundary lies in this chunk". Actions are callables taking the
`Progress` of the chunk just run, with a `finish` called once after the last step (also when no step was left).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol, Sequence

from trainer.config import RunConfig, steps_per_epoch


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A run's durations in steps."""

    steps_per_epoch: int
    total_steps: int
    steps_per_loop: int
    checkpoint_every: int
    global_batch: int

    @classmethod
    def of(cls, run: RunConfig, num_examples: int) -> "Schedule":
        """The schedule of `run` over a training split of `num_examples` (full global batches only)."""
        per_epoch = steps_per_epoch(num_examples, run.batch_size)
        return cls(per_epoch, per_epoch * run.epochs, run.steps_per_loop, run.checkpoint_every, run.batch_size)

    def chunks(self, start_step: int) -> list[tuple[int, int]]:
        """The (start, stop) step ranges of the tf.function calls from `start_step` to the end: steps_per_loop
        steps each, ending early at an epoch's end (so none spans two epochs) and at the last step."""
        spans, step = [], start_step
        while step < self.total_steps:
            epoch_end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
            spans.append((step, min(step + self.steps_per_loop, epoch_end, self.total_steps)))
            step = spans[-1][1]
        return spans

    def epoch_of(self, step: int) -> int:
        """Completed epochs after `step` steps."""
        return step // self.steps_per_epoch


def crossed(previous: int, step: int, every: int) -> bool:
    """True if a multiple of `every` lies in (previous, step]."""
    return step // every > previous // every


@dataclasses.dataclass(frozen=True)
class Progress:
    """What one chunk of steps did."""

    previous: int  # the step the chunk started at
    step: int  # the step it ended at
    epoch: int  # completed epochs at `step`
    epoch_end: bool  # the chunk ended an epoch
    loss_sum: float  # summed per-example training loss over the chunk
    correct: float  # correctly classified training examples in the chunk
    examples: int
    seconds: float

    @property
    def loss(self) -> float:
        """Mean training loss of the chunk."""
        return self.loss_sum / self.examples

    @property
    def accuracy(self) -> float:
        """Training accuracy of the chunk."""
        return self.correct / self.examples


class Action(Protocol):
    """Something done after a chunk of steps (summaries, evaluation, checkpoints, ...)."""

    def __call__(self, progress: Progress) -> None: ...

    def finish(self, step: int) -> None: ...


def run(train_steps: Callable[[int], tuple[float, float]], schedule: Schedule, start_step: int,
        actions: Sequence[Action]) -> None:
    """Train from `start_step` to the schedule's end in chunks; after each, call every action in order."""
    for step, stop in schedule.chunks(start_step):
        tick = time.perf_counter()
        loss_sum, correct = train_steps(stop - step)
        seconds = time.perf_counter() - tick
        epoch = schedule.epoch_of(stop)
        progress = Progress(step, stop, epoch, stop == epoch * schedule.steps_per_epoch, loss_sum, correct,
                            (stop - step) * schedule.global_batch, seconds)
        for action in actions:
            action(progress)
    for action in actions:
        action.finish(max(start_step, schedule.total_steps))
