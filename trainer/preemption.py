"""SIGTERM (Kubernetes preemption or delete), in one place. From the start of `train` the signal is a flag
(StopSignal). Before training, each phase ends with a check (nothing to save yet). After a chunk of steps, once
every worker agrees, the run saves a checkpoint at that step; after the last step, the final evaluation and
export are followed by the same check. Either way it ships within --grace-seconds of the signal and stops with
`Interrupted` (exit 75: retried without counting, resumed from that checkpoint; a fully trained run is then
only evaluated and exported)."""

from __future__ import annotations

import signal
import threading
import time
import types
from typing import TYPE_CHECKING, Callable, NoReturn

from trainer.config import EXIT_INTERRUPTED, TrainerError
from trainer.loop import Progress
from trainer.shipper import Shipper

if TYPE_CHECKING:  # the entry point holds a StopSignal before TensorFlow (which actions.py imports) loads
    from trainer.actions import Checkpointing


class Interrupted(TrainerError):
    """Training stopped on SIGTERM after saving a checkpoint; re-running resumes it."""

    exit_code = EXIT_INTERRUPTED

    @classmethod
    def after_saving(cls, step: int, shipped: bool, where: str) -> "Interrupted":
        """SIGTERM arrived in training or after it: the checkpoint of `step` is saved (and shipped, or not)."""
        state = "shipped to" if shipped else "saved locally (could not reach the store in time) in"
        return cls(f"interrupted by SIGTERM at step {step}; checkpoint {state} {where}; safe to retry")

    @classmethod
    def before_training(cls, phase: str) -> "Interrupted":
        """SIGTERM arrived before anything was trained in this attempt."""
        return cls(f"interrupted by SIGTERM {phase}, before training; nothing to save; safe to retry")


class StopSignal:
    """While entered: SIGTERM sets a flag (and starts the grace period) instead of ending the process."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: signal.Handlers | None = None
        self._received_at = 0.0

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def install(self) -> "StopSignal":
        """Take SIGTERM for the rest of the process (the entry point's use: a signal that comes after the work
        is done, while the process winds down, must not kill it with the signal's own exit code)."""
        return self.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self._received_at = time.monotonic()
        self._event.set()

    def check(self, phase: str) -> None:
        """Raise Interrupted if SIGTERM has arrived (at a point where nothing of this attempt is unsaved)."""
        if self.requested:
            raise Interrupted.before_training(phase)

    def remaining(self, grace: float) -> float:
        """Seconds left of a `grace`-second budget that started when SIGTERM arrived."""
        return max(0.0, grace - (time.monotonic() - self._received_at))

    @property
    def requested(self) -> bool:
        """True once SIGTERM has arrived."""
        return self._event.is_set()


class Preemption:
    """The loop's last action: stop at this step if SIGTERM reached any worker (`agree` makes them decide alike)."""

    def __init__(self, stop: StopSignal, agree: Callable[[bool], bool], checkpointing: Checkpointing,
                 shipper: Shipper | None, grace: float, local_root: str) -> None:
        self.stop, self.agree, self.checkpointing, self.shipper = stop, agree, checkpointing, shipper
        self.grace, self.local_root = grace, local_root

    def requested_anywhere(self) -> bool:
        """True if SIGTERM has reached any worker (every worker gets the same answer)."""
        return self.agree(self.stop.requested)

    def __call__(self, p: Progress) -> None:
        if self.shipper is not None and self.shipper.lost is not None:
            raise self.shipper.lost  # another trainer writes the run now: nothing of ours may reach it
        if not self.requested_anywhere():
            return
        if self.checkpointing.saved_step != p.step:
            self.checkpointing.save(p.step, p.epoch)
        self.stop_at(p.step)

    def finish(self, step: int) -> None:
        # After the final evaluation and export: the last step's checkpoint is saved (an epoch's end).
        if self.requested_anywhere():
            self.stop_at(step)

    def limit(self) -> float:
        """Seconds a blocking wait may take now: unbounded until SIGTERM, then what is left of the grace period."""
        return self.stop.remaining(self.grace) if self.stop.requested else float("inf")

    def stop_at(self, step: int) -> NoReturn:
        """Ship what is saved within what is left of the grace period, then raise Interrupted."""
        if self.shipper is None:  # a worker other than the chief: its copy stays local
            raise Interrupted.after_saving(step, False, self.local_root)
        shipped = self.shipper.flush(self.stop.remaining(self.grace))
        if self.shipper.lost is not None:
            raise self.shipper.lost
        raise Interrupted.after_saving(step, shipped, self.shipper.store.url if shipped else self.local_root)
