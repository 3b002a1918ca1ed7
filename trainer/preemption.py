"""What SIGTERM (Kubernetes preemption or delete) does. From the entry point's first line the signal is a
flag (sigterm.StopSignal). Before training, each phase ends with a check (nothing to save yet). After a chunk of
steps, once every worker agrees, the run saves a checkpoint at that step; after the last step, the final
evaluation and export are followed by the same check. Either way it ships within --grace-seconds of the signal
and stops with `Interrupted` (exit 75: retried without counting, resumed from that checkpoint; a fully trained
run is then only evaluated and exported)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NoReturn

from trainer.config import EXIT_INTERRUPTED, TrainerError
from trainer.loop import Progress
from trainer.shipper import Shipper
from trainer.sigterm import StopSignal

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
