"""`make docs` (`python -m bench.docs`): every block of docs/ that comes from a results file (bench/*.json) or
from the code (flags, make targets, the JobSet release), rendered between its markers
`<!-- NAME: make docs -->` and `<!-- end of NAME -->`. `--check` renders nothing and exits 1 naming each block
that differs. The measuring commands (make bench, faults, image-sizes, cluster-bench) render after they write."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from typing import Any, Callable

from bench.common import ROOT

BENCH = os.path.join(ROOT, "bench")


def _json(name: str) -> dict[str, Any]:
    with open(os.path.join(BENCH, name)) as f:
        return json.load(f)


def faults_table() -> str:
    """The fault trials' figure (bench/faults.json): the machine and date once, then one table."""
    f = _json("faults.json")
    moments = list(f["moments"])  # in the order of a run's life
    lines = [f"Measured on {f['date']} ({f['cpu']}), seed {f['seed']}, against fake-gcs-server on loopback (not real "
             "GCS).", "",
             "| trials | faults | kill -9 / SIGTERM | " + " | ".join(moments) + " | runs lost | invariant violations "
             "(observations) |", "|---" * (5 + len(moments)) + "|",
             f"| {f['trials']} | {f['faults']} | {f['kill']} / {f['sigterm']} | "
             + " | ".join(str(f["moments"][m]) for m in moments)
             + f" | **{f['runs_lost']}** | {f['violations']} ({f['observations']:,}) |", "",
             f"Steps lost per fault, against `--checkpoint-every {f['checkpoint_every']}`: kill -9 median "
             f"{f['steps_lost_kill']['median']:g}, max {f['steps_lost_kill']['max']}; SIGTERM median "
             f"{f['steps_lost_sigterm']['median']:g}, max {f['steps_lost_sigterm']['max']}."]
    return "\n".join(lines)


def bench_tables() -> str:
    """One table per suite of bench/results.json, each with its date and CPU."""
    from bench import scaling, storage_overhead, throughput, time_to_accuracy

    results = _json("results.json")
    parts = []
    for name, suite in (("throughput", throughput), ("time_to_accuracy", time_to_accuracy), ("scaling", scaling),
                        ("storage_overhead", storage_overhead)):
        if name not in results:
            continue
        r = results[name]
        cpu = r.get("cpu", "CPU not recorded")
        parts += [f"### {name.replace('_', ' ').capitalize()}", "",
                  f"Measured on {r['date'][:10]} ({cpu}). {r['workload']}.", "", "| measure | result |", "|---|---|"]
        parts += [f"| {label.strip()} | {value} |" for label, value in suite.rows(r)]
        parts.append("")
    return "\n".join(parts).rstrip()


def sigterm_table() -> str:
    from bench import sigterm

    return sigterm.table(_json("results.json")["sigterm"])


def image_sizes_table() -> str:
    from bench import image_sizes

    return image_sizes.render(_json("image_sizes.json"))


def cluster_figures() -> str:
    from bench import cluster

    return cluster.render(_json("cluster.json"))


def jobset_install() -> str:
    from trainer.launch.client import INSTALL_JOBSET

    return "\n".join(["```sh", INSTALL_JOBSET, "kubectl -n jobset-system wait --for=condition=available "
                      "deployment/jobset-controller-manager --timeout=300s", "```"])


def launcher_owned_flags() -> str:
    from trainer.launch.manifests import LAUNCHER_FLAGS

    return ", ".join(f"`{name}`" for name in LAUNCHER_FLAGS) + "."


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name ({} if it has none)."""
    actions = parser._actions  # noqa: SLF001 (argparse has no public list of them)
    return next((a.choices for a in actions if isinstance(a, argparse._SubParsersAction)), {})  # noqa: SLF001


def _help(*command: str) -> str:
    """A command's --help as a terminal 100 columns wide shows it."""
    result = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "100"}, check=True)
    return result.stdout.rstrip()


def trainer_help() -> str:
    """`python -m trainer COMMAND --help` of every command."""
    from trainer.cli import build_parser

    commands = subcommands(build_parser())
    return "\n\n".join(f"```\n$ python -m trainer {name} --help\n{_help('trainer', name)}\n```" for name in commands)


def launcher_help() -> str:
    """`mnist-launch --help` and that of every subcommand."""
    from trainer.launch.cli import build_parser

    commands = subcommands(build_parser())
    blocks = [f"```\n$ mnist-launch --help\n{_help('trainer.launch')}\n```"]
    blocks += [f"```\n$ mnist-launch {name} --help\n{_help('trainer.launch', name)}\n```" for name in commands]
    return "\n\n".join(blocks)


def make_help() -> str:
    result = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    return f"```\n$ make help\n{result.stdout.rstrip()}\n```"


# name -> (file under docs/, what renders it)
BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "faults": ("reliability.md", faults_table),
    "sigterm": ("reliability.md", sigterm_table),
    "image sizes": ("image.md", image_sizes_table),
    "cluster": ("kubernetes.md", cluster_figures),
    "jobset install": ("kubernetes.md", jobset_install),
    "launcher-owned flags": ("kubernetes.md", launcher_owned_flags),
    "bench": ("performance.md", bench_tables),
    "make help": ("reference.md", make_help),
    "trainer help": ("reference.md", trainer_help),
    "launcher help": ("reference.md", launcher_help),
}


def markers(name: str) -> tuple[str, str]:
    """The lines that open and close a block."""
    return f"<!-- {name}: make docs -->", f"<!-- end of {name} -->"


def block(name: str) -> str:
    """What the block holds now, stripped."""
    path, _ = BLOCKS[name]
    begin, end = markers(name)
    with open(os.path.join(ROOT, "docs", path)) as f:
        text = f.read()
    found = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, re.S)
    if found is None:
        sys.exit(f"error: docs/{path} has no '{begin}' ... '{end}' block")
    return found.group(1).strip()


def render(name: str) -> bool:
    """Write the block `name` from its source; True if it changed."""
    path, source = BLOCKS[name]
    begin, end = markers(name)
    body = source().strip()
    if block(name) == body:
        return False
    full = os.path.join(ROOT, "docs", path)
    with open(full) as f:
        head, rest = f.read().split(begin + "\n", 1)
    with open(full, "w") as f:
        f.write(f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}")
    return True


def publish(name: str, path: str, results: dict[str, Any] | None) -> None:
    """Write what a measuring command measured (unless None: re-render only) to its results file `path`, render
    the block `name` from it, and print the block."""
    if results is not None:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    render(name)
    print(block(name))


def main(argv: list[str]) -> int:
    """Render every block (or, with --check, name those that differ)."""
    if argv == ["--check"]:
        stale = [name for name, (_, source) in BLOCKS.items() if block(name) != source().strip()]
        for name in stale:
            print(f"error: docs/{BLOCKS[name][0]}: the {name} block differs from its source (run make docs)",
                  file=sys.stderr)
        return 1 if stale else 0
    for name in BLOCKS:
        if render(name):
            print(f"docs/{BLOCKS[name][0]}: {name} rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
