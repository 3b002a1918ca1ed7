"""The command line in real processes: help, bad input (exit 2, one line), SIGTERM and resume."""

from __future__ import annotations

import json
import os
import signal

import pytest

from conftest import checkpoint_steps, error_lines, run_cli, start_trainer, wait_until


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["predict"], ["analyze"], ["data"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: python -m trainer" in result.stdout


def _earlier_run(tmp_path) -> tuple[str, dict[str, bytes]]:
    run = tmp_path / "runs" / "keep"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"test_accuracy": 0.99}\n')
    return str(tmp_path / "runs"), {"metrics.json": (run / "metrics.json").read_bytes()}


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--dataset", "cifar10"], "unknown dataset 'cifar10'"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--batch-size", "65", "--cpu-replicas", "2"], "not divisible by 2 replicas"),
    (["--epochs", "three"], "invalid int value"),
    (["--data-source", "idx", "--data-dir", "{empty}"], "missing data file"),
    (["--data-source", "idx", "--data-dir", "{corrupt}"], "corrupt data file"),
    (["--output-dir", "{file}/runs"], "cannot write to"),
])
def test_bad_input_gets_one_line_exit_2_and_keeps_earlier_results(tmp_path, data_dir, args, message):
    output_dir, before = _earlier_run(tmp_path)
    corrupt = tmp_path / "corrupt" / "idx" / "mnist"
    corrupt.mkdir(parents=True)
    for name in os.listdir(os.path.join(data_dir, "idx", "mnist")):
        (corrupt / name).write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a folder")
    paths = {"empty": tmp_path / "empty", "corrupt": tmp_path / "corrupt", "file": tmp_path / "file"}
    args = [a.format(**paths) for a in args]
    base = ["train", "--output-dir", output_dir, "--run", "keep", "--data-dir", data_dir, "--epochs", "1"]
    result = run_cli(*base, *args)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert {n: open(os.path.join(output_dir, "keep", n), "rb").read() for n in before} == before


def test_sigterm_saves_then_rerun_resumes_the_step_count(tmp_path, data_dir):
    args = ["train", "--model", "mlp300", "--epochs", "2", "--batch-size", "100", "--checkpoint-every", "100",
            "--steps-per-loop", "20", "--output-dir", str(tmp_path), "--run", "r", "--data-dir", data_dir,
            "--cpu-replicas", "2"]
    process = start_trainer(*args)
    checkpoints = tmp_path / "r" / "checkpoints"
    saved_steps = lambda: checkpoint_steps(os.listdir(checkpoints) if checkpoints.is_dir() else [])  # noqa: E731
    assert wait_until(saved_steps, process=process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-2000:]
    assert "interrupted by SIGTERM" in error_lines(stderr)[0]
    saved = saved_steps()[-1]
    assert 0 < saved < 1200
    assert not os.path.exists(tmp_path / "r" / "metrics.json")

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {tmp_path / 'r'} from step {saved} of 1200" in result.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["steps"] == 1200 and metrics["resumed_from_step"] == saved
    # The history survives the interruption: each epoch once, whichever side of the signal it ended on.
    assert [(e["epoch"], e["step"]) for e in metrics["history"]] == [(1, 600), (2, 1200)]
    assert saved_steps()[-1] == 1200
    assert metrics["test_accuracy"] > 0.9
