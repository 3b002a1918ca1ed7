"""The image definition: hadolint-clean, its base pinned or said to be unpinned, non-root, the trainer as entrypoint
and every CUDA wheel pinned."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import DOCKERFILE, ROOT, image_entrypoint


def test_hadolint_passes():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", DOCKERFILE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_base_is_debian_bookworm_pinned_by_digest_or_stated_unpinned_in_the_dockerfiles_own_comment():
    text = open(DOCKERFILE).read()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)  # a build argument: the tests build on a stand-in
    tag, base = re.search(r"^# base: (\S+)\nARG BASE_IMAGE=(\S+)$", text, re.M).groups()
    assert tag == "debian:bookworm-slim"  # Debian's own Python 3.11: what the tests' debootstrap base has
    if base == tag:  # a bare tag only where the Dockerfile says why (make pin-base pins it where Docker Hub answers)
        assert re.search(r"^# Unpinned while ARG BASE_IMAGE names a bare tag: ", text, re.M)
    else:
        assert re.fullmatch(r"debian@sha256:[0-9a-f]{64}", base)
    # Debian's python3 and the CA certificates, at the versions tested.
    assert re.search(r"apt-get install -y --no-install-recommends python3=\S+ python3-venv=\S+\s+\\?\s*"
                     r"ca-certificates=\S+", text)


def test_the_image_runs_the_trainer_as_a_non_root_user_with_sigterm_held_until_it_takes_it():
    text = open(DOCKERFILE).read()
    assert re.search(r"^USER [1-9]\d*:[1-9]\d*$", text, re.M)
    assert image_entrypoint() == ["env", "--block-signal=TERM", "python", "-m", "trainer"]  # see test_cli
    assert "TRAINER_DATA_DIR=/opt/data" in text
    # TensorFlow 2.21 finds cuSOLVER's wheel only through LD_LIBRARY_PATH (make gpu-check), and GKE mounts the
    # node's driver at /usr/local/nvidia/lib64.
    path = re.search(r"LD_LIBRARY_PATH=(\S+)", text).group(1).split(":")
    assert path == ["/opt/venv/lib/python3.11/site-packages/nvidia/cusolver/lib", "/usr/local/nvidia/lib64"]


def test_a_code_change_rebuilds_only_the_last_layers_and_the_builder_gets_exactly_what_is_copied():
    text = open(DOCKERFILE).read()
    # The system layer, the data, then the dependencies, then the code: a code change reuses all the layers below.
    assert text.index("apt-get install") < text.index("COPY build/data") < text.index("COPY setup.py") \
        < text.index("pip install --no-cache-dir --no-build-isolation -c") < text.index("COPY trainer/")
    # The flavour is declared just before the step that uses it: both flavours share the layers below.
    assert text.index("ARG FLAVOUR=gpu") > text.index("COPY build/data")
    # At most two steps after the dependencies: vfs builders keep a full copy of the file system per step.
    instructions = re.findall(r"^([A-Z]+) ", text, re.M)
    after = len(instructions) - 1 - max(i for i, word in enumerate(instructions) if word == "RUN")
    assert after <= 2, instructions
    ignore = open(DOCKERFILE + ".dockerignore").read().splitlines()
    assert "**" in ignore
    copied = [source for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for source in line.split()]
    assert set(copied) == {"setup.py", "docker/requirements-no-deps.txt", "docker/constraints.txt", "build/data/idx/",
                           "trainer/"}
    assert all(f"!{source}" in ignore for source in copied)  # everything copied is sent to the builder


def test_every_cuda_wheel_of_the_gpu_flavour_is_pinned():
    import importlib.metadata

    from packaging.requirements import Requirement

    pinned = {line.split("==")[0].lower() for line in open(os.path.join(os.path.dirname(DOCKERFILE),
                                                                        "constraints.txt")) if "==" in line}
    # Every dependency is installed under the constraints, the CUDA wheels of the gpu flavour too.
    assert '-c /tmp/deps/constraints.txt "/tmp/deps$extras"' in open(DOCKERFILE).read()
    extra = [Requirement(r) for r in importlib.metadata.requires("tensorflow") if "and-cuda" in r]
    assert extra and {r.name.lower() for r in extra} <= pinned
