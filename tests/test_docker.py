"""The image definition: hadolint-clean, pinned official base, non-root, the trainer as entrypoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import DOCKERFILE, image_entrypoint


def test_hadolint_passes():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", DOCKERFILE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_pinned_non_root_and_runs_the_trainer():
    text = open(DOCKERFILE).read()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)  # a build argument whose default is the official image
    tag, base = re.search(r"^# base: (\S+)\nARG BASE_IMAGE=(\S+)$", text, re.M).groups()
    assert re.fullmatch(r"tensorflow/tensorflow:2\.21\.\d+-gpu", tag)  # the tag, beside its pin (`make pin-base`)
    assert base == tag or re.fullmatch(r"tensorflow/tensorflow@sha256:[0-9a-f]{64}", base)
    assert re.search(r"^USER [1-9]\d*:[1-9]\d*$", text, re.M)
    assert image_entrypoint() == ["env", "--block-signal=TERM", "python", "-m", "trainer"]  # see test_cli
    # The data, then the dependencies, then the code: a code change reuses the dependency and data layers.
    assert text.index("COPY build/data") < text.index("COPY setup.py") < text.index("pip install --no-cache-dir -c") \
        < text.index("COPY trainer/")
    # At most two steps after the dependencies: vfs builders keep a full copy of the file system per step.
    instructions = re.findall(r"^([A-Z]+) ", text, re.M)
    after = len(instructions) - 1 - max(i for i, word in enumerate(instructions) if word == "RUN")
    assert after <= 2, instructions
    assert "TRAINER_DATA_DIR=/opt/data" in text
    ignore = open(DOCKERFILE + ".dockerignore").read().splitlines()
    assert "**" in ignore
    copied = [source for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for source in line.split()]
    assert set(copied) == {"setup.py", "docker/requirements-no-deps.txt", "docker/constraints.txt", "build/data/idx/",
                           "trainer/"}
    assert "pip install --no-cache-dir -c /tmp/deps/constraints.txt /tmp/deps" in text  # every dependency pinned
    assert all(f"!{source}" in ignore for source in copied)  # everything copied is sent to the builder
