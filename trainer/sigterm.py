"""SIGTERM as a flag (StopSignal). Kept free of other imports: the entry point takes the signal before it loads
anything else, so a SIGTERM while Python imports the trainer is not lost (preemption.py acts on the flag)."""

from __future__ import annotations

import signal
import threading
import time
import types


class StopSignal:
    """While entered: SIGTERM sets a flag (and starts the grace period) instead of ending the process."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: signal.Handlers | None = None
        self._received_at = 0.0

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._handle)
            if previous != self._handle:  # taken again (after TensorFlow's own handler): keep the first
                self._previous = previous
            # A launcher may block SIGTERM until a handler exists (the mask survives exec): one sent while the
            # interpreter started is then pending, and arrives here.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return self

    def install(self) -> "StopSignal":
        """Take SIGTERM for the rest of the process (the entry point's use: a signal that comes after the work
        is done, while the process winds down, must not kill it with the signal's own exit code)."""
        return self.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def release(self) -> None:
        """Give SIGTERM back its previous action, and act on one that already arrived (commands that do not
        train have nothing to save: the signal ends them as it would have)."""
        self.__exit__()
        if self.requested:
            signal.raise_signal(signal.SIGTERM)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self._received_at = time.monotonic()
        self._event.set()

    def check(self, phase: str) -> None:
        """Raise Interrupted if SIGTERM has arrived (at a point where nothing of this attempt is unsaved)."""
        if self.requested:
            from trainer.preemption import Interrupted  # only now: the entry point imports this module first

            raise Interrupted.before_training(phase)

    def remaining(self, grace: float) -> float:
        """Seconds left of a `grace`-second budget that started when SIGTERM arrived."""
        return max(0.0, grace - (time.monotonic() - self._received_at))

    @property
    def requested(self) -> bool:
        """True once SIGTERM has arrived."""
        return self._event.is_set()
