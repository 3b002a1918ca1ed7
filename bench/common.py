"""What the benchmark suites share: the repository root, a trainer command line, and running a reference program."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_command(output_dir: str, run: str, scratch: str, *flags: str) -> list[str]:
    """`python -m trainer train` for one run folder, with its scratch folder and extra flags."""
    return [sys.executable, "-m", "trainer", "train", *flags, "--output-dir", output_dir, "--run", run,
            "--scratch-dir", scratch]


def mnist_data_dir() -> str:
    """The trainer's default data dir, MNIST's IDX files imported there from the packaged copy if missing (what
    the trainer reads by default, and what the peers read; every reader verifies them)."""
    from trainer.config import DataConfig
    from trainer.datasets import idx_complete, idx_dir, import_packaged

    data_dir = os.path.expanduser(DataConfig().data_dir)
    if not idx_complete(idx_dir(data_dir, "mnist")):
        import_packaged("mnist", data_dir)
    return data_dir


def reference_env(onednn: bool | None = None) -> dict[str, str]:
    """The environment of a reference program; onednn None leaves oneDNN to TensorFlow's own default."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = "1" if onednn else "0"
    return env


def reference_command(name: str, *args: str) -> list[str]:
    """The command line of the reference program bench/references/<name>.py."""
    return [sys.executable, "-m", f"bench.references.{name}", *args]


def reference(name: str, *args: str, onednn: bool | None = None) -> str:
    """Run a reference program in a fresh process; the last line it prints."""
    result = subprocess.run(reference_command(name, *args), cwd=ROOT, env=reference_env(onednn), check=True,
                            capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1]


def cpu_model() -> str:
    """The CPU's model name and its vector extensions that matter to the kernels (this machine's CPU changes)."""
    flags, name = set(), platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    extensions = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]
    return f"{name} ({', '.join(extensions) or 'no AVX2'})"
