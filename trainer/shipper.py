"""Shipper: a background thread mirroring a local run folder to its Store while training runs.

Ordering rules that make the store safe to read (and to resume from) at any moment:
- checkpoint data and index files are uploaded before the `checkpoints/checkpoint` pointer that
  names them, and old checkpoints are deleted only after the pointer stops naming them;
- other changed files go in the run folder's `ship_rank` order (model markers after the rest of model/,
  metrics.json last);
- TensorBoard event files are sent as they grow, appending only the new bytes where the store can;
- with a lease, nothing is written unless it is surely held, and every commit (the pointer, model markers,
  metrics.json) renews it first: a shipper whose lease was taken over writes nothing more (`lost`).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Callable

from trainer.lease import Lease, LeaseLost
from trainer.run_dir import CHECKPOINTS, KEEP_CHECKPOINTS, POINTER, RunFolder, checkpoint_pointer, ship_rank
from trainer.storage import Store, StoreUnavailable, is_partial

def _is_shippable(name: str) -> bool:
    # Checkpoints go only through ship_checkpoint, in order; files in progress never.
    return name.split("/")[0] != CHECKPOINTS and not is_partial(name)


class Shipper:
    """Background thread mirroring new and changed files of a local run folder to a Store."""

    def __init__(self, local: RunFolder, store: Store, interval: float = 10.0,
                 shipped_checkpoints: list[str] | None = None, log: Callable[[str], None] = print,
                 lease: Lease | None = None) -> None:
        self.local, self.store, self.interval, self.log, self.lease = local, store, interval, log, lease
        self._sent: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) now in the store
        self._checkpoints = list(shipped_checkpoints or [])  # in the store, oldest first
        self._pending: collections.deque[str] = collections.deque()  # saved, not yet committed, in order
        self._pass_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)
        self.last_error: StoreUnavailable | None = None

    @property
    def lost(self) -> LeaseLost | None:
        """Why this shipper may no longer write (the run's lease went to another trainer), or None."""
        return self.lease.lost if self.lease is not None else None

    def _fence(self, commit: bool) -> None:
        if self.lease is not None:
            self.lease.renew() if commit else self.lease.confirm()

    def __enter__(self) -> "Shipper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=1.0)

    def ship_checkpoint(self, path: str) -> None:
        """Queue the checkpoint just saved at `path`; checkpoints are committed in the order saved."""
        self._pending.append(os.path.basename(path))
        self._wake.set()

    def flush(self, timeout: float, limit: Callable[[], float] | None = None) -> bool:
        """Ship everything now, retrying until it is all in the store or `timeout` seconds pass (or, if `limit`
        is given, the seconds it returns at any moment, whichever is less)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = min(deadline - time.monotonic(), limit() if limit is not None else float("inf"))
            if self.lost is not None or remaining <= 0 or not self._pass_lock.acquire(timeout=remaining):
                return False
            try:
                if self._pass():
                    return True
            finally:
                self._pass_lock.release()
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            with self._pass_lock:
                self._pass()

    def _pass(self) -> bool:
        """One mirroring pass; False (and the error kept for the next pass) if the store failed."""
        if self.lost is not None:
            return False
        try:
            # Checkpoints first: a kill loses the work since the last committed one, and a pass of other files
            # (event files, history) takes a while on a slow store.
            while self._pending:
                self._commit_checkpoint(self._pending[0])
                self._pending.popleft()
            self._ship_files()
        except LeaseLost:
            return False
        except Exception as error:  # noqa: BLE001 - the shipper must never stop training
            error = error if isinstance(error, StoreUnavailable) else StoreUnavailable(f"{type(error).__name__}: {error}")
            if self.last_error is None:
                self.log(f"warning: store unreachable, will retry (training goes on): {error}")
            self.last_error = error
            return False
        if self.last_error is not None:
            self.log(f"store reachable again: {self.store.url}")
            self.last_error = None
        return True

    def _local_files(self) -> list[str]:
        names = []
        for folder, _, files in os.walk(self.local.root):
            for file in files:
                name = os.path.relpath(os.path.join(folder, file), self.local.root).replace(os.sep, "/")
                if _is_shippable(name):
                    names.append(name)
        return sorted(names, key=lambda name: (ship_rank(name), name))

    def _ship_files(self) -> None:
        for name in self._local_files():
            path = self.local.path(*name.split("/"))
            try:
                stat = os.stat(path)
            except FileNotFoundError:  # replaced while we looked
                continue
            state = (stat.st_size, stat.st_mtime_ns)
            sent = self._sent.get(name)
            if sent == state:
                continue
            self._fence(commit=ship_rank(name) > 0)
            if not (sent is not None and "tfevents" in name and self._append(name, path, sent[0], stat.st_size)):
                self.store.upload(path, name)
            self._sent[name] = state

    def _append(self, name: str, path: str, offset: int, size: int) -> bool:
        with open(path, "rb") as f:
            f.seek(offset)
            tail = f.read(size - offset)
        return size > offset and len(tail) == size - offset and self.store.append(name, tail, offset)

    def _commit_checkpoint(self, checkpoint: str) -> None:
        folder = self.local.checkpoints
        try:
            files = sorted(f for f in os.listdir(folder) if f.startswith(f"{checkpoint}."))
        except FileNotFoundError:
            files = []
        if not any(f.endswith(".index") for f in files):
            return  # rotated away locally before we got to it; a newer one is queued behind it
        try:
            for file in sorted(files, key=lambda f: f.endswith(".index")):  # data first, index last
                self._fence(commit=False)
                self.store.upload(os.path.join(folder, file), f"{CHECKPOINTS}/{file}")
        except FileNotFoundError:
            return
        kept = [c for c in self._checkpoints if c != checkpoint][-(KEEP_CHECKPOINTS - 1):] + [checkpoint]
        self._fence(commit=True)
        self.store.write(POINTER, checkpoint_pointer(checkpoint, kept))
        self._checkpoints = kept
        for name in self.store.list(f"{CHECKPOINTS}/"):
            base = name[len(CHECKPOINTS) + 1:].split(".")[0]
            if name != POINTER and base not in kept:
                self.store.delete(name)
