"""The frameworks a user would pick instead (PyTorch, JAX), each in its own virtual environment under
build/peers/<name>, made on first use from bench/references/requirements-<name>.txt and remade when that file
changes. Their programs (bench/references/<name>_cnn.py) read the project's verified IDX files and print JSON."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from bench.common import ROOT

PEERS = ("torch", "jax")
REFERENCES = os.path.join(ROOT, "bench", "references")


def python(peer: str) -> str:
    """The peer environment's python, made or remade first if its requirements changed."""
    requirements = os.path.join(REFERENCES, f"requirements-{peer}.txt")
    with open(requirements, "rb") as f:
        wanted = hashlib.sha256(f.read()).hexdigest()
    venv = os.path.join(ROOT, "build", "peers", peer)
    stamp = os.path.join(venv, ".requirements-sha256")
    if not os.path.exists(stamp) or open(stamp).read() != wanted:
        print(f"making the {peer} environment in {venv} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "-r", requirements], check=True)
        with open(stamp, "w") as f:
            f.write(wanted)
    return os.path.join(venv, "bin", "python")


def command(peer: str, *args: str) -> list[str]:
    """The command line of the peer's program (run from the repository root, which it imports IDX reading from)."""
    return [python(peer), "-m", f"bench.references.{peer}_cnn", *args]


def run(peer: str, *args: str) -> dict:
    """Run the peer's program in a fresh process; its last JSON line."""
    result = subprocess.run(command(peer, *args), cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])

