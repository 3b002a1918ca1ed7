"""The image definition: hadolint-clean, pinned official base, non-root, the trainer as entrypoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def test_hadolint_passes():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", DOCKERFILE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_pinned_non_root_and_runs_the_trainer():
    text = open(DOCKERFILE).read()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"tensorflow/tensorflow:2\.21\.\d+-gpu", base)
    assert re.search(r"^USER [1-9]\d*:[1-9]\d*$", text, re.M)
    assert 'ENTRYPOINT ["python", "-m", "trainer"]' in text
    # Dependencies are installed before the code is copied, so code changes reuse the dependency layer.
    assert text.index("COPY setup.py") < text.index("pip install --no-cache-dir .") < text.index("COPY trainer/")
    ignore = open(os.path.join(ROOT, "docker", "Dockerfile.dockerignore")).read().splitlines()
    assert "**" in ignore
    copied = [source for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for source in line.split()]
    assert set(copied) == {"setup.py", "docker/requirements-no-deps.txt", "trainer/"}
    assert all(f"!{source}" in ignore for source in copied)  # everything copied is sent to the builder
