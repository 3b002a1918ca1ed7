"""The run's lease: one writer per run. The chief takes `lease.json` in the run's store before it writes
anything, renews it every quarter of its time to live, and releases it at the end; every write is a
conditional one (GCS: `if_generation_match`; a local folder: a compare-and-replace under a file lock).

- Free: no lease, a released one, or a stale one: not renewed for its time to live as seen from here (or,
  by the holder's own clock, two of them ago), or held by a trainer on this machine whose scratch-folder lock
  this one now holds (so that holder has exited).
- Held by a live trainer of another job (or of none): refused with one line naming it (LeaseHeld, exit 73).
- Held by an earlier attempt of this job (TRAINER_JOB; a pod restarted after preemption or a lost worker):
  waited for, until it is released or stale, then taken over.
- Fencing: the holder writes only while its last successful renewal is less than half the time to live old
  (`confirm`), and renews before every commit (checkpoint pointer, model markers, metrics.json): a trainer
  that finds another holder has lost the lease (LeaseLost, exit 75) and writes nothing more.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from trainer.config import EXIT_INTERRUPTED, EXIT_LEASED, TrainerError
from trainer.storage import Conflict, Store, StoreUnavailable

LEASE = "lease.json"
RELEASE_SECONDS = 3.0  # at most this long to release at exit (an unreleased lease expires by itself)


class LeaseHeld(TrainerError):
    """Another live trainer holds the run's lease."""

    exit_code = EXIT_LEASED


class LeaseLost(TrainerError):
    """Another trainer took over the lease of this one's run: it stopped writing."""

    exit_code = EXIT_INTERRUPTED


def _clock(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def holder_of(record: dict[str, Any]) -> str:
    """Who holds a lease, for messages: 'HOST pid N (job NS/NAME)'."""
    job = f" (job {record['job']})" if record.get("job") else ""
    return f"{record.get('holder', '?')}{job}"


def _parse(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        record = json.loads(data)
        float(record["expires"]), float(record["ttl"])
        return record
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: nobody can renew it, so it is free (written over conditionally)


def _held(url: str, record: dict[str, Any]) -> LeaseHeld:
    left = max(0, round(float(record["expires"]) - time.time()))
    return LeaseHeld(f"run {url} is being trained by {holder_of(record)}; its lease runs until "
                     f"{_clock(float(record['expires']))} (in {left} s) unless renewed; wait for it to end, or give "
                     "another --run")


def held_here(store: Store, process: str) -> LeaseHeld:
    """The refusal of a run that `process`, a trainer on this machine, holds the scratch folder of: naming the
    lease's holder once that trainer has taken it (it takes it after locking its scratch)."""
    record = _parse(store.read(LEASE))
    if record is None or record.get("released"):
        return LeaseHeld(f"run {store.url} is in use by another trainer on this machine ({process}); wait "
                         "for it to end, or give another --run")
    return _held(store.url, record)


class Lease:
    """This trainer's claim on a run: acquired (or refused), renewed in the background, checked before writes."""

    def __init__(self, store: Store, ttl: float, job: str | None, lock_id: str,
                 log: Callable[[str], None] = print) -> None:
        self.store, self.ttl, self.job, self.lock_id, self.log = store, ttl, job, lock_id, log
        self.generation = 0
        self.lost: LeaseLost | None = None
        self._valid_until = 0.0
        self._attempt = uuid.uuid4().hex[:12]
        self._writes = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease", daemon=True)

    def acquire(self, check: Callable[[str], None] | None = None) -> "Lease":
        """Take the lease (waiting for an earlier attempt of this job to give it up) and start renewing it."""
        first_seen: dict[int, float] = {}
        waiting = False
        while True:
            if check is not None:
                check("while waiting for the run's lease")
            data, generation = self.store.read_versioned(LEASE)
            record = _parse(data)
            unchanged = time.monotonic() - first_seen.setdefault(generation, time.monotonic())
            if record is None or self._stale(record, unchanged):
                try:
                    self._write(generation)
                except Conflict:
                    continue  # another trainer wrote it meanwhile: look again
                if record is not None and not record.get("released"):
                    self.log(f"run {self.store.url}: took over the lease of {holder_of(record)}, which stopped "
                             "renewing it")
                self._thread.start()
                return self
            if self.job is None or record.get("job") != self.job:
                raise _held(self.store.url, record)
            if not waiting:
                self.log(f"run {self.store.url}: waiting for the lease of an earlier attempt of this job, "
                         f"{holder_of(record)}, to end; it expires by {_clock(float(record['expires']))}")
                waiting = True
            time.sleep(min(1.0, float(record["ttl"]) / 8))

    def _stale(self, record: dict[str, Any], unchanged: float) -> bool:
        return bool(record.get("released")) or record.get("lock") == self.lock_id or \
            unchanged >= float(record["ttl"]) or time.time() > float(record["expires"]) + float(record["ttl"])

    def _write(self, generation: int, released: bool = False) -> None:
        """Write this trainer's record over `generation`; raise Conflict if the lease is no longer there."""
        self._writes += 1
        now = time.time()
        data = json.dumps({
            "holder": f"{socket.gethostname()} pid {os.getpid()}", "job": self.job, "ttl": self.ttl,
            "renewed": _clock(now), "expires": now + self.ttl, "released": released, "lock": self.lock_id,
            "write": f"{self._attempt}-{self._writes}",
        }, indent=1).encode()
        started = time.monotonic()
        try:
            self.generation = self.store.write_if(LEASE, data, generation)
        except Conflict:
            current, current_generation = self.store.read_versioned(LEASE)
            if current != data:  # not a retried write of ours whose answer was lost
                raise
            self.generation = current_generation
        self._valid_until = started + self.ttl / 2

    def renew(self) -> None:
        """Renew the lease now; raise LeaseLost if another trainer holds it, StoreUnavailable if unreachable."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            try:
                # A cheap read first: it also catches a takeover where a store does not enforce preconditions
                # (the GCS emulator the tests use does not).
                if self.store.generation(LEASE) == self.generation:
                    self._write(self.generation)
                    return
            except Conflict:
                pass
            data, _ = self.store.read_versioned(LEASE)
            record = _parse(data)
            who = holder_of(record) if record is not None and not record.get("released") else "nobody (released)"
            self.lost = LeaseLost(f"run {self.store.url}: lost its lease to {who} after {self.ttl:g} s without "
                                  "renewing it (store unreachable, or this process paused); stopped writing; safe "
                                  "to retry")
            raise self.lost

    def confirm(self) -> None:
        """Raise LeaseLost if the lease was lost, StoreUnavailable if it is not surely held now (not renewed
        for half its time to live): a write must wait for the next renewal."""
        if self.lost is not None:
            raise self.lost
        if time.monotonic() > self._valid_until:
            raise StoreUnavailable(f"could not renew the lease of {self.store.url}; not writing until renewed")

    def _beat(self) -> None:
        while not self._stopping.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseLost:
                return  # the trainer stops at its next check
            except Exception:  # noqa: BLE001 - unreachable now: writes wait (confirm), the next beat retries
                continue

    def release(self) -> None:
        """Give the lease up (within RELEASE_SECONDS; if the store cannot be reached, it expires by itself)."""
        self._stopping.set()
        done = threading.Thread(target=self._release, name="lease-release", daemon=True)
        done.start()
        done.join(RELEASE_SECONDS)

    def _release(self) -> None:
        with self._lock:
            if self.lost is None and self.generation:
                try:
                    self._write(self.generation, released=True)
                except Exception:  # noqa: BLE001 - lost or unreachable: nothing to give up, or it expires
                    pass
                self.generation = 0
