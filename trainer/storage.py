"""Stores: where a run's objects live. Also the one rule for files in progress (hidden partial names).

Two Store backends share one interface: LocalStore (a folder, the default) and GCSStore
(Google Cloud Storage through google-cloud-storage; credentials the library's usual way:
Application Default Credentials, Workload Identity on GKE; `STORAGE_EMULATOR_HOST` for an emulator).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
import uuid
from typing import Any

from trainer.config import EXIT_STORE, ConfigError, TrainerError

REQUEST_TIMEOUT = (5.0, 30.0)  # seconds to connect, to read, per HTTP request
UPLOADS = ".uploads"  # store-side scratch for appended tails: hidden, so partial; no 'tfevents' in its names


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXT = tuple(os.strerror(code) for code in _NO_SPACE)  # "No space left on device", ...


def disk_full(error: BaseException) -> bool:
    """True if `error` says a local disk is full (or a quota or file-size limit reached): Python's OSError, or
    TensorFlow's ResourceExhaustedError from writing a checkpoint, summary or SavedModel."""
    if isinstance(error, OSError):
        return error.errno in _NO_SPACE
    return type(error).__name__ == "ResourceExhaustedError" and any(t in str(error) for t in _NO_SPACE_TEXT)


def partial_path(path: str) -> str:
    """Where to write `path` before an atomic rename: a hidden, unique name beside it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.partial-{uuid.uuid4().hex[:12]}")


def is_partial(name: str) -> bool:
    """True for a file in progress (any part of its '/'-separated name is hidden): never read, listed or shipped."""
    return any(part.startswith(".") for part in name.split("/"))


class StoreUnavailable(TrainerError):
    """The store could not be reached (after retries)."""

    exit_code = EXIT_STORE


class Conflict(Exception):
    """A conditional write found the object at another generation than the one it was conditional on."""


class Store:
    """Objects named by '/'-separated paths relative to one run's location. Every object has a generation, a
    number that changes with each write (0: no such object); `write_if` replaces an object only at a given one."""

    url: str
    local_root: str | None = None  # the folder itself when the store is one on this machine

    def check(self) -> None:
        """Raise ConfigError (bad location) or StoreUnavailable (cannot reach it) before training."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> dict[str, int]:
        """name -> size of every object whose name starts with prefix."""
        raise NotImplementedError

    def read(self, name: str) -> bytes | None:
        """An object's bytes, or None if it does not exist."""
        raise NotImplementedError

    def write(self, name: str, data: bytes) -> None:
        """Create or replace an object atomically."""
        raise NotImplementedError

    def upload(self, local_path: str, name: str) -> None:
        """Create or replace an object from a local file atomically."""
        raise NotImplementedError

    def append(self, name: str, data: bytes, offset: int) -> bool:
        """Append `data` to an object that is `offset` bytes long; False if it is not (or cannot)."""
        return False

    def download(self, name: str, local_path: str) -> None:
        """Copy an object into a local file."""
        raise NotImplementedError

    def generation(self, name: str) -> int:
        """The object's current generation; 0 if it does not exist."""
        raise NotImplementedError

    def read_versioned(self, name: str) -> tuple[bytes | None, int]:
        """An object's bytes (None if it does not exist) and the generation they are of."""
        raise NotImplementedError

    def write_if(self, name: str, data: bytes, generation: int) -> int:
        """Create or replace an object only if it is at `generation` (0: only if it does not exist), atomically;
        return its new generation; raise Conflict otherwise."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove an object if it exists."""
        raise NotImplementedError


class LocalStore(Store):
    """A folder on a local or mounted file system."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.local_root = self.root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def check(self) -> None:
        # Probe the nearest folder that exists: the run's own folders are made by its first write, so a run
        # refused before that leaves nothing behind.
        existing = self.root
        while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
            if os.path.exists(existing):
                raise ConfigError(f"cannot write to {self.root}: {existing} is a file, not a folder")
            existing = os.path.dirname(existing)
        probe = partial_path(os.path.join(existing, "write-probe"))
        try:
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as error:
            raise ConfigError(f"cannot write to {self.root}: {error.strerror or error}") from error

    def list(self, prefix: str = "") -> dict[str, int]:
        found = {}
        for folder, _, files in os.walk(self.root):
            for file in files:
                name = os.path.relpath(os.path.join(folder, file), self.root).replace(os.sep, "/")
                if name.startswith(prefix) and not is_partial(name):
                    found[name] = os.path.getsize(os.path.join(folder, file))
        return found

    def read(self, name: str) -> bytes | None:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _replace(self, name: str, fill: Any) -> None:
        target = self._path(name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = partial_path(target)
        fill(tmp)
        os.replace(tmp, target)

    def write(self, name: str, data: bytes) -> None:
        self._replace(name, lambda tmp: _write_file(tmp, data))

    def upload(self, local_path: str, name: str) -> None:
        self._replace(name, lambda tmp: shutil.copyfile(local_path, tmp))

    def append(self, name: str, data: bytes, offset: int) -> bool:
        try:
            with open(self._path(name), "r+b") as f:
                if f.seek(0, os.SEEK_END) != offset:
                    return False
                f.write(data)
        except FileNotFoundError:
            return False
        return True

    def download(self, name: str, local_path: str) -> None:
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
        shutil.copyfile(self._path(name), local_path)

    def delete(self, name: str) -> None:
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            pass

    # A local object's generation is its modification time in nanoseconds, which every conditional write sets
    # past the previous one; the compare and the replace happen under an exclusive lock on a hidden file beside it.
    def generation(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_mtime_ns
        except FileNotFoundError:
            return 0

    def read_versioned(self, name: str) -> tuple[bytes | None, int]:
        with self._exclusive(name):
            return self.read(name), self.generation(name)

    def write_if(self, name: str, data: bytes, generation: int) -> int:
        with self._exclusive(name):
            current = self.generation(name)
            if current != generation:
                raise Conflict(f"{name} is at generation {current}, not {generation}")
            new = max(time.time_ns(), current + 1)
            self._replace(name, lambda tmp: _write_file(tmp, data, mtime_ns=new))
            return new

    def _exclusive(self, name: str) -> "_Flock":
        target = self._path(name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return _Flock(os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock"))


class GCSStore(Store):
    """gs://BUCKET/PREFIX through google-cloud-storage, retrying transient errors with backoff."""

    def __init__(self, url: str, retry_seconds: float = 60.0) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        match = re.fullmatch(r"gs://([a-z0-9][a-z0-9._-]{1,221}[a-z0-9])(/.*)?", url.rstrip("/"))
        if not match:
            raise ConfigError(f"not a gs://BUCKET/PREFIX location: {url}")
        self.url = url.rstrip("/")
        self.bucket_name = match.group(1)
        self.prefix = (match.group(2) or "").strip("/")
        # 429, 5xx, timeouts and dropped connections, with exponential backoff; our writes are
        # whole-object replacements, so retrying them is safe.
        self.retry = DEFAULT_RETRY.with_timeout(retry_seconds)
        self._bucket: Any = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def bucket(self) -> Any:
        if self._bucket is None:
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import storage

            # google-cloud-storage 3.x reads each bucket's metadata in a background thread, for trace attributes
            # even with tracing off: storage.buckets.get, which roles/storage.objectUser lacks (a denied request).
            os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
            try:
                client = storage.Client()
            except DefaultCredentialsError as error:
                raise ConfigError(
                    "no Google Cloud credentials (use Workload Identity, `gcloud auth application-default "
                    "login` or GOOGLE_APPLICATION_CREDENTIALS)"
                ) from error
            self._bucket = client.bucket(self.bucket_name)
        return self._bucket

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from google.api_core import exceptions as api
        from google.auth.exceptions import TransportError

        try:
            return fn(*args, retry=self.retry, timeout=REQUEST_TIMEOUT, **kwargs)
        except api.Forbidden as error:
            raise ConfigError(f"no permission on gs://{self.bucket_name}: {error.message}") from error
        except (api.NotFound, api.PreconditionFailed):
            raise  # answers, not failures: the callers handle them
        except (api.GoogleAPICallError, api.RetryError, TransportError, ConnectionError, TimeoutError,
                OSError) as error:
            raise StoreUnavailable(f"{self.url}: {type(error).__name__}: {str(error)[:200]}") from error

    def check(self) -> None:
        from google.api_core import exceptions as api

        # Listing at most one object needs only storage.objects.list, which the roles a run is given hold
        # (roles/storage.objectUser, objectViewer); reading the bucket's metadata would need storage.buckets.get.
        try:
            self._blobs("", limit=1)
        except api.NotFound as error:
            raise ConfigError(f"bucket gs://{self.bucket_name} does not exist") from error

    def _blobs(self, prefix: str, limit: int | None = None) -> list[Any]:
        return self._call(lambda **kw: list(self.bucket.client.list_blobs(
            self.bucket_name, prefix=self._key(prefix), max_results=limit, **kw)))

    def list(self, prefix: str = "") -> dict[str, int]:
        base = f"{self._key('')}" if self.prefix else ""
        blobs = self._blobs(prefix)
        return {b.name[len(base):]: b.size for b in blobs if not is_partial(b.name[len(base):])}

    def read(self, name: str) -> bytes | None:
        from google.api_core import exceptions as api

        try:
            return self._call(self.bucket.blob(self._key(name)).download_as_bytes)
        except api.NotFound:
            return None

    def write(self, name: str, data: bytes) -> None:
        self._call(self.bucket.blob(self._key(name)).upload_from_string, data)

    def upload(self, local_path: str, name: str) -> None:
        self._call(self.bucket.blob(self._key(name)).upload_from_filename, local_path)

    def append(self, name: str, data: bytes, offset: int) -> bool:
        # Send only the new bytes, then let GCS concatenate them server-side (compose). The
        # generation precondition stops a retried compose from appending the bytes twice.
        from google.api_core import exceptions as api

        target = self.bucket.blob(self._key(name))
        try:
            self._call(target.reload)
        except api.NotFound:
            return False
        if target.size != offset:
            return False
        part = self.bucket.blob(self._key(f"{UPLOADS}/{uuid.uuid4().hex}"))
        self._call(part.upload_from_string, data)
        # A fresh destination object: the reloaded one carries the old checksum, which GCS would check.
        destination = self.bucket.blob(self._key(name))
        try:
            self._call(destination.compose, [target, part], if_generation_match=target.generation)
        except api.PreconditionFailed:
            self._call(target.reload)
            return target.size == offset + len(data)
        finally:
            self._call(part.delete)
        return True

    def download(self, name: str, local_path: str) -> None:
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
        self._call(self.bucket.blob(self._key(name)).download_to_filename, local_path)

    def delete(self, name: str) -> None:
        from google.api_core import exceptions as api

        try:
            self._call(self.bucket.blob(self._key(name)).delete)
        except api.NotFound:
            pass

    def generation(self, name: str) -> int:
        blob = self._call(self.bucket.get_blob, self._key(name))
        return 0 if blob is None else int(blob.generation)

    def read_versioned(self, name: str) -> tuple[bytes | None, int]:
        from google.api_core import exceptions as api

        while True:
            blob = self._call(self.bucket.get_blob, self._key(name))
            if blob is None:
                return None, 0
            generation = int(blob.generation)
            try:  # the bytes of exactly that generation (it may have been replaced since)
                return self._call(blob.download_as_bytes, if_generation_match=generation), generation
            except (api.NotFound, api.PreconditionFailed):
                continue

    def write_if(self, name: str, data: bytes, generation: int) -> int:
        from google.api_core import exceptions as api

        blob = self.bucket.blob(self._key(name))
        try:
            self._call(blob.upload_from_string, data, if_generation_match=generation)
        except api.PreconditionFailed as error:
            raise Conflict(f"{name} is no longer at generation {generation}") from error
        return int(blob.generation)


def _write_file(path: str, data: bytes, mtime_ns: int | None = None) -> None:
    """Write `data` to `path` and close it; then, if given, set its modification time (after the last write,
    which would move it)."""
    with open(path, "wb") as f:
        f.write(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


class _Flock:
    """An exclusive lock on a file, held while entered (the kernel drops it if the holder dies)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def open_store(location: str, retry_seconds: float = 60.0) -> Store:
    """The store at `location`: GCS for gs://BUCKET/PREFIX, else a local folder."""
    if location.startswith("gs://"):
        return GCSStore(location, retry_seconds)
    return LocalStore(location)
