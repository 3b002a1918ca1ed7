"""The run folder, `<output-dir>/<run>/`: its layout, its local scratch copy, and opening a run.

A run lives in its Store (a local folder or gs://); training works in a local scratch folder that starts empty
and is filled from the store (the store is the truth), and the Shipper mirrors it back. This module owns:
- the layout: config.json, history.json, checkpoints/ (with the `checkpoint` pointer, written last, naming
  only complete checkpoints), logs/, model/ (completed by its MODEL_MARKERS), metrics.json (the "finished"
  mark, written last), analysis/;
- the order files reach the store in (`ship_rank`) and the checkpoint-pointer format;
- opening a run for training (restore, resume conflicts, "already finished") and for reading
  (evaluate, predict, analyze), and writing a reader's results back.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Callable

from trainer.cluster import Task
from trainer.config import Config, ConfigError, config_from_dict, resume_conflicts, resumed
from trainer.lease import Lease, held_here
from trainer.storage import Store, open_store, partial_path

CONFIG = "config.json"
HISTORY = "history.json"  # per-epoch train and test metrics so far (copied into metrics.json at the end)
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
POINTER = f"{CHECKPOINTS}/checkpoint"
LOGS = "logs"
HPARAMS_LOG = (LOGS, "test")  # the TensorBoard run that holds a run's hparams (its session)
HPARAMS_SUFFIX = ".hparams"  # the events file that holds them, apart from the scalars
MODEL = "model"
ANALYSIS = "analysis"
# The files tf.saved_model writes last: a model/ folder holding them is complete.
MODEL_MARKERS = ("saved_model.pb", "fingerprint.pb")
KEEP_CHECKPOINTS = 3  # kept locally by the checkpoint manager and in the store by the pointer
_POINTER_PATHS = re.compile(r'^(model_checkpoint_path|all_model_checkpoint_paths): "([^"]+)"$', re.M)


def to_json(data: dict[str, Any]) -> str:
    """Indented JSON with each list of numbers on one line (matrix rows stay readable)."""
    text = json.dumps(data, indent=2)
    one_line = lambda m: re.sub(r"\s+", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]")  # noqa: E731
    return re.sub(r"\[[\d\s.,eE+-]+\]", one_line, text) + "\n"


class RunFolder:
    """A run folder on this machine (a scratch copy, or the run itself when the store is local)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))

    def path(self, *parts: str) -> str:
        """A path inside the run folder."""
        return os.path.join(self.root, *parts)

    @property
    def checkpoints(self) -> str:
        """The checkpoints/ folder."""
        return self.path(CHECKPOINTS)

    @property
    def logs(self) -> str:
        """The TensorBoard logs/ folder."""
        return self.path(LOGS)

    @property
    def model(self) -> str:
        """The exported SavedModel folder."""
        return self.path(MODEL)

    def read_json(self, name: str) -> dict[str, Any] | None:
        """Contents of a JSON file in the run folder, or None if it does not exist."""
        try:
            with open(self.path(name)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise ConfigError(f"unreadable {self.path(name)}: {error}") from error

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Write a JSON file atomically (never a half-written file)."""
        os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
        tmp = partial_path(self.path(name))
        with open(tmp, "w") as f:
            f.write(to_json(data))
        os.replace(tmp, self.path(name))

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics: a finished run's (metrics.json), else those recorded so far."""
        for name in (METRICS, HISTORY):
            data = self.read_json(name)
            if data is not None and "history" in data:
                return list(data["history"])
        return []

    def has_model(self) -> bool:
        """True if model/ holds a complete export."""
        return is_complete_model(self.model)


def is_complete_model(folder: str) -> bool:
    """True if `folder` holds a whole SavedModel (its markers are written last)."""
    return all(os.path.isfile(os.path.join(folder, marker)) for marker in MODEL_MARKERS)


def ship_rank(name: str) -> int:
    """Order in which a changed file reaches the store: 0 first; model markers after the rest of model/;
    metrics.json (the "finished" mark) last."""
    if name == METRICS:
        return 2
    return 1 if name in {f"{MODEL}/{marker}" for marker in MODEL_MARKERS} else 0


def checkpoint_pointer(latest: str, kept: list[str]) -> bytes:
    """The text of a TensorFlow `checkpoint` state file naming `kept` (oldest first) and `latest`."""
    lines = [f'model_checkpoint_path: "{latest}"'] + [f'all_model_checkpoint_paths: "{p}"' for p in kept]
    return ("\n".join(lines) + "\n").encode()


def parse_pointer(text: bytes) -> tuple[str | None, list[str]]:
    """(latest, all kept) checkpoint names from a `checkpoint` state file (paths reduced to base names)."""
    latest, kept = None, []
    for key, value in _POINTER_PATHS.findall(text.decode(errors="replace")):
        name = os.path.basename(value)
        if key == "model_checkpoint_path":
            latest = name
        else:
            kept.append(name)
    return latest, kept


def checkpoint_step(name: str) -> int:
    """The step a checkpoint file or prefix is numbered by: checkpoints/ckpt-500.index -> 500."""
    match = re.search(r"ckpt-(\d+)", name)
    if match is None:
        raise ValueError(f"not a checkpoint name: {name}")
    return int(match.group(1))


def location(output_dir: str, run: str) -> str:
    """Where run `run` under `output_dir` (a folder or gs://BUCKET/PREFIX) lives."""
    return f"{output_dir.rstrip('/')}/{run}"


def scratch_folder(config: Config, store_url: str) -> RunFolder:
    """The local folder a run trains in: `<scratch_dir>/<run>`, or by default
    `<system temp>/mnist-trainer-<uid>/<run>-<hash of store_url>` (per user, as the temp dir is shared; per
    store, as two output dirs may hold runs of the same name). `store_url` is the run's store as it names itself
    (an absolute path for a folder), so `runs` and `/home/me/runs` are one run, and `runs` in two folders two."""
    if config.run.scratch_dir:
        return RunFolder(os.path.join(config.run.scratch_dir, config.run.run))
    where = hashlib.sha256(store_url.encode()).hexdigest()[:10]
    base = os.path.join(tempfile.gettempdir(), f"mnist-trainer-{os.getuid()}")
    return RunFolder(os.path.join(base, f"{config.run.run}-{where}"))


def _unwritable(folder: RunFolder, error: OSError) -> ConfigError:
    """The error for a scratch folder this user cannot write."""
    return ConfigError(f"cannot write the scratch folder {folder.root} ({error.strerror}); "
                       "give --scratch-dir a folder you can write")


class ScratchBusy(ConfigError):
    """Another live trainer (`holder`: 'process PID') holds the scratch folder's lock."""

    def __init__(self, folder: RunFolder, pid: str) -> None:
        self.holder = f"process {pid}"
        super().__init__(f"scratch folder {folder.root} is in use by another trainer ({self.holder}); give this one "
                         "another --scratch-dir")


class ScratchLock:
    """An exclusive lock on a scratch folder (a locked file beside it) for as long as a trainer uses it: no
    other trainer empties or writes a scratch folder a live one holds. The kernel drops it when the holder dies."""

    def __init__(self, folder: RunFolder) -> None:
        path = folder.root + ".lock"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:  # not allowed, read-only, or under something that is no folder
            raise _unwritable(folder, error) from error
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 100, 0).decode(errors="replace").strip() or "?"
            self.release()
            raise ScratchBusy(folder, holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        stat = os.fstat(self._fd)
        # The lock file itself, machine-wide: a lease recorded with this id was held by a trainer that held
        # this lock, so once it is ours, that trainer has exited.
        self.identity = f"{_boot_id()}:{stat.st_dev}:{stat.st_ino}"

    def release(self) -> None:
        """Let another trainer use the folder."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def restore(store: Store, local: RunFolder, check: Callable[[str], None] | None = None) -> list[str]:
    """Bring a run's config, history, metrics and the checkpoints its pointer keeps from the store into an empty
    local folder (older ones too: a newest checkpoint that does not load falls back to them); return the kept
    checkpoints, oldest first. `check` is called between checkpoints (it may raise to stop)."""
    os.makedirs(local.checkpoints, exist_ok=True)
    for name in (CONFIG, HISTORY, METRICS):
        data = store.read(name)
        if data is not None:
            with open(local.path(name), "wb") as f:
                f.write(data)
    pointer = store.read(POINTER)
    if pointer is None:
        return []
    latest, kept = parse_pointer(pointer)
    if latest is None:
        return []
    kept = [name for name in kept if name != latest] + [latest]
    for checkpoint in kept:
        if check is not None:
            check("while restoring the run")
        for name in store.list(f"{CHECKPOINTS}/{checkpoint}."):
            store.download(name, local.path(*name.split("/")))
    with open(local.path(*POINTER.split("/")), "wb") as f:
        f.write(checkpoint_pointer(latest, kept))
    return kept


@dataclasses.dataclass
class TrainingRun:
    """A run opened for training: its store, the scratch folder it trains in, what the store already held."""

    config: Config
    store: Store
    local: RunFolder
    shipped: list[str]  # checkpoints the store's pointer kept, oldest first
    lock: ScratchLock
    lease: Lease | None  # the chief's; other workers never write the store
    task: Task

    def close(self) -> None:
        """Release the run's lease and the scratch folder (its contents stay, a cache of the store)."""
        if self.lease is not None:
            self.lease.release()
        self.lock.release()

    @property
    def url(self) -> str:
        """Where the run lives: a folder or gs:// location."""
        return self.store.url

    def finished(self, total_steps: int) -> dict[str, Any] | None:
        """The metrics of a run that already trained `total_steps` steps, else None."""
        metrics = self.local.read_json(METRICS)
        return metrics if metrics is not None and metrics.get("steps") == total_steps else None

    def start(self, start_step: int) -> list[dict[str, Any]]:
        """Record this run's config; return the history up to `start_step` (later epochs are trained again)."""
        self.local.write_json(CONFIG, self.config.to_dict())
        return [entry for entry in self.local.history() if entry["step"] <= start_step]

    def drop_hparams(self) -> None:
        """Remove the hparams an earlier attempt wrote (from the store: scratch never holds old logs)."""
        for name in self.store.list("/".join(HPARAMS_LOG) + "/"):
            if name.endswith(HPARAMS_SUFFIX):
                self.store.delete(name)

    def record_history(self, history: list[dict[str, Any]]) -> None:
        """Keep the per-epoch metrics so far (shipped with the run)."""
        self.local.write_json(HISTORY, {"history": history})

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write metrics.json, the mark of a finished run."""
        self.local.write_json(METRICS, metrics)


def open_for_training(config: Config, task: Task = Task(), given: set[str] | None = None,
                      log: Callable[[str], None] = print, check: Callable[[str], None] | None = None) -> TrainingRun:
    """Check the store, take the run's lease (the chief), and fill an emptied scratch folder from the store. A
    run that exists is resumed: its saved settings, with this attempt's own and the `given` ones (all, if None)
    from `config`; a resume that would change what is learned is refused."""
    where = location(config.run.output_dir, config.run.run)
    store = open_store(where, min(60.0, config.run.store_timeout))
    store.check()
    local = scratch_folder(config, store.url)
    try:
        lock = ScratchLock(local)
    except ScratchBusy as busy:
        if config.run.scratch_dir:
            raise
        # The default folder is this store's and run's own: another trainer here is training this very run.
        raise held_here(store, busy.holder) from None
    lease = None
    try:
        config = _settings(config, given, store)  # before the lease: a refused resume writes nothing
        if task.chief:  # its own store: each renewal gives up retrying before the next one is due
            lease = Lease(open_store(where, config.run.lease_seconds / 4), config.run.lease_seconds, task.job,
                          lock.identity, log).acquire(check)
        return TrainingRun(config, store, local, _fill(log, check, store, local), lock, lease, task)
    except BaseException:
        if lease is not None:
            lease.release()
        lock.release()
        raise


def _settings(config: Config, given: set[str] | None, store: Store) -> Config:
    """The settings of this attempt: `config`, or for a run that exists its saved ones resumed with `config`'s."""
    data = store.read(CONFIG)
    if data is None:
        return config
    try:
        previous = config_from_dict(json.loads(data))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"run {store.url}: its {CONFIG} is unreadable ({error}); repair it, or remove it and give "
                          "the run's flags again") from error
    config = resumed(previous, config, given)
    conflicts = resume_conflicts(previous, config)
    if conflicts:
        raise ConfigError(f"run {store.url} was started with other settings ({'; '.join(conflicts)})")
    return config


def _fill(log: Callable[[str], None], check: Callable[[str], None] | None, store: Store,
          local: RunFolder) -> list[str]:
    """Empty the scratch folder and restore the run into it; the checkpoints the store keeps, oldest first."""
    shutil.rmtree(local.root, ignore_errors=True)
    try:
        shipped = restore(store, local, check)
    except PermissionError as error:
        raise _unwritable(local, error) from error
    for name in (METRICS, HISTORY):  # results that are written again: an unreadable copy is dropped
        try:
            local.read_json(name)
        except ConfigError as error:
            log(f"warning: run {store.url}: ignoring its unreadable {name} ({error.__cause__}); it is written again")
            os.remove(local.path(name))
    return shipped


@dataclasses.dataclass
class ReadRun:
    """A run opened for reading: a local folder with the parts asked for, and where results go back."""

    store: Store
    folder: RunFolder

    def config(self, data_dir: str | None = None) -> Config:
        """The run's saved configuration, reading its data from `data_dir` if given."""
        saved = self.folder.read_json(CONFIG)
        if saved is None:
            raise ConfigError(f"{self.store.url} has no {CONFIG} (is it a run folder?)")
        config = config_from_dict(saved)
        if not data_dir:
            return config
        return dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=data_dir))

    def publish(self, *parts: str) -> None:
        """Make the store's `parts` (folders of the run) what the reader wrote there, replacing earlier ones."""
        if self.store.local_root == self.folder.root:
            return
        for part in parts:
            written = set()
            for base, _, files in os.walk(self.folder.path(part)):
                for file in files:
                    path = os.path.join(base, file)
                    name = os.path.relpath(path, self.folder.root).replace(os.sep, "/")
                    self.store.upload(path, name)
                    written.add(name)
            for name in set(self.store.list(f"{part}/")) - written:
                self.store.delete(name)


def open_for_reading(output_dir: str, run: str, parts: tuple[str, ...]) -> ReadRun:
    """The run `<output_dir>/<run>` as a local folder: itself if local, else `parts` (names or folder/
    prefixes of the layout) fetched from the store into a temporary folder."""
    store = open_store(location(output_dir, run))
    if store.local_root is not None:
        if not os.path.isdir(store.local_root):
            raise ConfigError(f"no run folder {store.local_root}")
        return ReadRun(store, RunFolder(store.local_root))
    store.check()
    local = RunFolder(tempfile.mkdtemp(prefix="mnist-trainer-"))
    names = sorted(name for part in parts for name in store.list(part))
    if not names:
        raise ConfigError(f"no run at {store.url}")
    for name in names:
        store.download(name, local.path(*name.split("/")))
    return ReadRun(store, local)
