"""The docs hold to the code and to the results files: every rendered block is what its source gives now (a
measured table from bench/*.json, a help text from the code), every make target, make variable and flag the
README and docs show exists, `make help` lists every target and variable, and the README stays short and
free of the measurement diary."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess

import pytest

from bench import docs
from bench import image_sizes as sizes
from bench import sigterm
from bench.common import ROOT
from trainer.cli import build_parser as trainer_parser
from trainer.launch.cli import build_parser as launcher_parser

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# Flags of the other tools the docs show commands of (gcloud, kubectl, env, podman, buildah, unshare, skopeo).
OTHER_TOOLS_FLAGS = {
    "--accelerator", "--block-signal", "--cluster", "--device", "--enable-autoscaling", "--filter", "--format",
    "--isolation", "--load", "--location", "--machine-type", "--max-nodes", "--member", "--min-nodes",
    "--node-locations", "--node-taints", "--num-nodes", "--password-stdin", "--pid", "--recursive",
    "--release-channel", "--repository-format", "--role", "--storage-driver", "--total-max-nodes",
    "--uniform-bucket-level-access", "--user", "--workload-pool"}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    found = {option for action in parser._actions for option in action.option_strings  # noqa: SLF001
             if option.startswith("--")}
    return found.union(*(_flags(sub) for sub in docs.subcommands(parser).values()))


def _prose(path: str) -> str:
    """A page without its rendered blocks (they are checked against their sources instead)."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    for name in docs.BLOCKS:
        begin, end = docs.markers(name)
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), "", text, flags=re.S)
    return text


def _makefile() -> str:
    with open(os.path.join(ROOT, "Makefile")) as f:
        return f.read()


def _targets() -> set[str]:
    phony = re.search(r"^\.PHONY: (.*?)(?<!\\)$", _makefile(), re.M | re.S).group(1)
    return set(phony.replace("\\", " ").split())


def _variables_in_help() -> list[str]:
    return [name for line in re.findall(r"^##@ [^:]+: (.*)$", _makefile(), re.M) for name in line.split()]


@pytest.mark.parametrize("name", list(docs.BLOCKS))
def test_every_rendered_block_is_what_its_source_gives_now(name):
    assert docs.block(name) == docs.BLOCKS[name][1]().strip(), f"run make docs: the {name} block is stale"


def test_the_measured_figures_behind_the_blocks_are_whole():
    with open(sizes.RESULTS) as f:
        image = json.load(f)
    gpu, cpu = image["flavours"]["gpu"], image["flavours"]["cpu"]
    # The flavours share every layer but the dependencies', and the code's layer is the small one a change ships.
    assert [layer["layer"] for layer in gpu["layers"]] == [layer["layer"] for layer in cpu["layers"]]
    assert gpu["layers"][-1]["compressed"] < 1e6 and gpu["layers"][-2]["compressed"] > 1e9
    with open(os.path.join(ROOT, "bench", "results.json")) as f:
        measured = json.load(f)["sigterm"]
    # Every preset, measured with the grace `submit --spot` gives the trainer, and each fit in it.
    assert set(measured["presets"]) == set(sigterm.PRESETS) and measured["grace_seconds"] == sigterm.GRACE
    assert all(p["max"] < measured["grace_seconds"] for p in measured["presets"].values())
    with open(os.path.join(ROOT, "bench", "cluster.json")) as f:
        cluster = json.load(f)
    assert cluster["cold_build_seconds"] > cluster["start_seconds"] > 0 and cluster["binaries_bytes"] > 0
    with open(os.path.join(ROOT, "bench", "faults.json")) as f:
        faults = json.load(f)
    assert faults["trials"] >= 20 and faults["runs_lost"] == 0 and faults["violations"] == 0
    assert all(faults["moments"].values())  # every moment of a run's life was hit


def test_make_help_is_the_default_goal_and_lists_every_target_and_variable_on_one_screen():
    shown = subprocess.run(["make", "--no-print-directory"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) <= 50, shown.stdout
    described = set(re.findall(r"^## ([a-z-]+): ", _makefile(), re.M))
    assert described == _targets()
    assert all(re.search(rf"^  {target} ", shown.stdout, re.M) for target in _targets())
    listed = _variables_in_help()
    assert len(listed) == len(set(listed))
    knobs = set(re.findall(r"^([A-Z_]+) +\?=", _makefile(), re.M)) | {"CONTAINER", "LOCAL_GPUS"}  # set if unset
    assert set(listed) == knobs
    assert all(name in shown.stdout for name in listed)


def test_every_make_target_variable_and_flag_the_docs_show_exists():
    targets, variables = _targets(), set(_variables_in_help())
    flags = _flags(trainer_parser()) | _flags(launcher_parser())
    for page in PAGES:
        text = _prose(page)
        # `make ...` in code: inline spans, and lines of code blocks (after a prompt or a variable setting).
        code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
        commands = re.findall(r"`(?:[A-Z_]+=\S+ )*make ([^`]*)`", text) + \
            re.findall(r"^(?:[A-Z_]+=\S+ )*make ([^#\n]*)", code, re.M)
        for command in (re.split(r"&&|;|\|", c)[0] for c in commands):
            words = command.split()
            goals = [w for w in words[:next((i for i, w in enumerate(words) if not re.fullmatch(r"[a-z][a-z-]*", w)),
                                            len(words))]]
            assert set(goals) <= targets, (page, command)
            for name in re.findall(r"(?<![\w$])([A-Z][A-Z_]+)=", command):
                assert name in variables, (page, command)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
            assert flag in flags | OTHER_TOOLS_FLAGS, (page, flag)


def test_every_flag_and_make_target_appears_in_the_reference():
    with open(os.path.join(ROOT, "docs", "reference.md")) as f:
        reference = f.read()
    for flag in _flags(trainer_parser()) | _flags(launcher_parser()):
        assert flag in reference, flag
    for target in _targets():
        assert re.search(rf"^  {target} ", reference, re.M), target


def test_the_readme_is_short_and_the_docs_hold_no_times_of_day_or_suite_figures():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 200
    # The README quotes no measurement at all, not even in example output: those are rendered into docs/.
    assert not re.findall(r"\d+\.\d+%|\d+ steps/s", readme)
    for page in PAGES:
        text = _prose(page)  # code included: an example's clock or run name is a time of day too
        assert not re.findall(r"(?<![\d:.])(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?(?![\d:])", text), page
        assert not re.findall(r"\b20\d{6}-\d{6}\b", text), page  # a generated run name's date and time
        assert not re.findall(r"\b\d+ (?:tests? )?passed\b|\b\d+ tests\b", text), page


def test_the_jobset_the_docs_install_is_the_one_the_local_control_plane_tests():
    from trainer.launch.manifests import JOBSET_RELEASE

    with open(os.path.join(ROOT, "tests", "cluster", "jobset", "go.mod")) as f:
        assert re.search(rf"^\s*sigs\.k8s\.io/jobset {re.escape(JOBSET_RELEASE)}\b", f.read(), re.M)
    assert JOBSET_RELEASE in docs.block("jobset install")
