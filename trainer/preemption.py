"""SIGTERM (Kubernetes preemption or delete), in one place: the signal becomes a flag; after a chunk of steps,
once every worker agrees, the run saves a checkpoint at that step, ships it within --grace-seconds of the
signal and stops with `Interrupted` (exit 75: retried without counting, resumed from that checkpoint)."""

from __future__ import annotations

import signal
import threading
import time
import types
from typing import Callable

from trainer.actions import Checkpointing
from trainer.config import EXIT_INTERRUPTED, TrainerError
from trainer.loop import Progress
from trainer.shipper import Shipper


class Interrupted(TrainerError):
    """Training stopped on SIGTERM after saving a checkpoint; re-running resumes it."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, step: int, shipped: bool, where: str) -> None:
        state = "shipped to" if shipped else "saved locally (could not reach the store in time) in"
        super().__init__(f"interrupted by SIGTERM at step {step}; checkpoint {state} {where}; safe to retry")
        self.step = step


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


class Preemption:
    """The loop's last action: stop at this step if SIGTERM reached any worker (`agree` makes them decide alike)."""

    def __init__(self, stop: StopSignal, agree: Callable[[bool], bool], checkpointing: Checkpointing,
                 shipper: Shipper | None, grace: float, local_root: str) -> None:
        self.stop, self.agree, self.checkpointing, self.shipper = stop, agree, checkpointing, shipper
        self.grace, self.local_root = grace, local_root

    def __call__(self, p: Progress) -> None:
        if not self.agree(self.stop.requested):
            return
        if self.checkpointing.saved_step != p.step:
            self.checkpointing.save(p.step, p.epoch)
        if self.shipper is None:  # a worker other than the chief: its copy stays local
            raise Interrupted(p.step, False, self.local_root)
        shipped = self.shipper.flush(self.stop.remaining(self.grace))
        raise Interrupted(p.step, shipped, self.shipper.store.url if shipped else self.local_root)

    def finish(self, step: int) -> None:
        pass
