"""The run folder `<output-dir>/<run>/`: its layout, JSON files and checks (local folders)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from trainer.config import ConfigError


def to_json(data: dict[str, Any]) -> str:
    """Indented JSON with each list of numbers on one line (matrix rows stay readable)."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[[\d\s.,eE+-]+\]", lambda m: re.sub(r"\s+", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]"), text) + "\n"


class RunFolder:
    """Paths inside one run folder: config.json, checkpoints/, logs/{train,test}/, model/, metrics.json."""

    def __init__(self, output_dir: str, run: str) -> None:
        if output_dir.startswith("gs://"):
            raise ConfigError("gs:// output dirs are not supported yet; use a local folder")
        self.root = os.path.join(os.path.expanduser(output_dir), run)

    def path(self, *parts: str) -> str:
        """A path inside the run folder."""
        return os.path.join(self.root, *parts)

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    @property
    def logs(self) -> str:
        return self.path("logs")

    @property
    def model(self) -> str:
        return self.path("model")

    def ensure_writable(self) -> None:
        """Create the run folder, or raise ConfigError if it cannot be written."""
        probe = self.path(".write-probe")
        try:
            os.makedirs(self.root, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as error:
            raise ConfigError(f"cannot write to {self.root}: {error.strerror or error}") from error

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
        tmp = self.path(f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(to_json(data))
        os.replace(tmp, self.path(name))
