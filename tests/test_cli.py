"""The command line in real processes: help, bad input (exit 2, one line), SIGTERM and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import (ROOT, catches_sigterm, checkpoint_steps, error_lines, image_entrypoint, run_cli, start_trainer,
                      wait_until)
from fault_trials import MOMENTS, Attempt, evaluates_as_recorded, inject, shipped_step, trainer_args
from trainer.config import EXIT_INTERRUPTED, EXIT_NO_GPU, config_from_args
from trainer.storage import GCSStore


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["predict"], ["analyze"], ["data"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: python -m trainer" in result.stdout


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "analyze", "data"])
def test_every_flag_has_help_that_shows_its_default(command):
    result = run_cli(command, "--help", env={"COLUMNS": "1000"})  # one line per flag
    options = result.stdout.split("options:\n")[1]
    flags = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options)]  # a flag and its help
    assert len(flags) > 3
    for line in flags:
        name = line.split()[0].rstrip(",")
        assert name == "-h" or "(default: " in line or "(required)" in line, line

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
    (["--data-source", "idx", "--data-dir", "{empty}"], "(import them with `python -m trainer data --dataset mnist "
                                                         "--data-dir"),
    (["--data-source", "idx", "--data-dir", "{corrupt}"], "corrupt data file"),
    (["--output-dir", "{file}/runs"], "cannot write to"),
    (["--expect-gpus", "1", "--cpu-replicas", "2"], "--expect-gpus and --cpu-replicas exclude each other"),
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
    assert result.stderr == errors[0] + "\n" and result.stdout == ""  # that line and nothing else
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

    # A resume needs only where the run is (and this machine's own settings): the rest is the run's config.json.
    result = run_cli("train", "--output-dir", str(tmp_path), "--run", "r", "--data-dir", data_dir,
                     "--cpu-replicas", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {tmp_path / 'r'} from step {saved} of 1200" in result.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["steps"] == 1200 and metrics["resumed_from_step"] == saved
    # The history survives the interruption: each epoch once, whichever side of the signal it ended on.
    assert [(e["epoch"], e["step"]) for e in metrics["history"]] == [(1, 600), (2, 1200)]
    assert saved_steps()[-1] == 1200
    assert metrics["test_accuracy"] > 0.9


def test_gpus_tensorflow_cannot_see_end_the_run_at_start_with_one_line_and_exit_71(tmp_path, data_dir):
    """A pod given GPUs (the launcher passes --expect-gpus) on a node or image whose CUDA stack does not load
    exits at once rather than train on the CPU; it gives the run's lease back, and writes nothing else."""
    import tensorflow as tf

    visible = len(tf.config.list_physical_devices("GPU"))
    result = run_cli("train", "--model", "mlp300", "--data-dir", data_dir, "--output-dir", str(tmp_path), "--run",
                     "r", "--expect-gpus", str(visible + 1))
    assert result.returncode == EXIT_NO_GPU and result.stdout == "", result.stderr[-2000:]
    # The cause, named: here (no NVIDIA driver, and no CUDA wheels in the test environment) both.
    assert result.stderr.startswith(f"error: this pod was given {visible + 1} GPU(s) but TensorFlow sees {visible}: no "
                                    "NVIDIA driver: libcuda.so.1 not found (the node's driver is mounted into the "
                                    "container by NVIDIA's device plugin or container toolkit; GKE mounts it at "
                                    "/usr/local/nvidia/lib64); libcudart.so.12, libcublas.so.12, ")
    assert result.stderr.endswith(" not found where TensorFlow looks (an image without the CUDA libraries: use the "
                                  "gpu flavour); not training on the CPU instead\n")
    assert result.stderr.count("\n") == 1 and "libcudnn.so.9" in result.stderr
    assert [name for name in os.listdir(tmp_path / "r") if not name.startswith(".")] == ["lease.json"]
    assert json.loads((tmp_path / "r" / "lease.json").read_text())["released"] is True


def test_gpus_hidden_by_the_environment_are_named_as_the_cause(tmp_path, data_dir):
    result = run_cli("train", "--model", "mlp300", "--data-dir", data_dir, "--output-dir", str(tmp_path), "--run",
                     "r", "--expect-gpus", "2", env={"CUDA_VISIBLE_DEVICES": "-1"})
    assert result.returncode == EXIT_NO_GPU
    assert result.stderr == ("error: this pod was given 2 GPU(s) but TensorFlow sees 0: CUDA_VISIBLE_DEVICES='-1' "
                             "hides every GPU from TensorFlow; not training on the CPU instead\n")


def test_gpus_command_names_each_library_and_exits_71_where_they_are_missing():
    result = run_cli("gpus")
    assert result.returncode == EXIT_NO_GPU and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "TensorFlow 2.21.0, built for CUDA 12.5.1 and cuDNN 9"
    assert lines[1].split()[:3] == ["MISSING", "cudart", "libcudart.so.12"]
    assert "not found where TensorFlow looks (LD_LIBRARY_PATH, then the RUNPATH of libtensorflow_framework.so.2" \
        in lines[1]
    assert lines[-2].split()[:3] == ["MISSING", "driver", "libcuda.so.1"]
    assert lines[-1].startswith("not usable, so TensorFlow would not start on a GPU: libcudart.so.12, ")


STEP_LINE = r"step \d+/600 \(\d+%\)  loss \d\.\d{4}  accuracy \d+\.\d\d%  \d+ steps/s  eta \d:\d\d:\d\d"
EPOCH_LINE = r"epoch 1/1: test accuracy (\d+\.\d\d)%  test loss \d\.\d{4}"


def test_a_normal_run_prints_only_what_a_user_can_act_on(tmp_path, data_dir, mnist):
    """stderr a log file (not a terminal): whole progress lines, the epoch's result; stdout: the summary."""
    run = ["--output-dir", str(tmp_path), "--run", "r"]
    result = run_cli("train", "--model", "mlp300", "--epochs", "1", "--data-dir", data_dir, *run)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert all(re.fullmatch(STEP_LINE, line) for line in lines[:-1]), lines
    accuracy = re.fullmatch(EPOCH_LINE, lines[-1]).group(1)
    assert result.stdout == (f"test accuracy {accuracy}%  test loss {lines[-1].split()[-1]}  600 steps on 1 "
                             f"replica(s)  run folder: {tmp_path / 'r'}\n")
    evaluate = run_cli("evaluate", *run)
    assert evaluate.returncode == 0 and evaluate.stderr == "", evaluate.stderr
    assert f"{json.loads(evaluate.stdout)['test_accuracy']:.2%}" == f"{accuracy}%"
    image = tmp_path / "seven.png"
    Image.fromarray(mnist["test"].images[0, :, :, 0]).save(image)
    predict = run_cli("predict", *run, str(image))
    assert predict.returncode == 0 and predict.stderr == "", predict.stderr
    assert predict.stdout.startswith(f"{image}\t7\t")


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "cnn", "--output-dir", "{runs}", "--run", "mlp"], "was started with other settings"),
    (["train", "--output-dir", "{file}/runs", "--run", "x"], "is a file, not a folder"),
    (["evaluate", "--output-dir", "{runs}", "--run", "missing"], "no run folder"),
    (["analyze", "--output-dir", "{runs}", "--run", "missing"], "no run folder"),
])
def test_refusals_that_need_no_tensorflow_answer_before_it_loads(tmp_path, argv, message):
    runs = tmp_path / "runs"
    (runs / "mlp").mkdir(parents=True)
    (runs / "mlp" / "config.json").write_text(json.dumps(config_from_args({"model": "mlp300"}).to_dict()))
    (tmp_path / "file").write_text("not a folder")
    argv = [a.format(runs=runs, file=tmp_path / "file") for a in argv]
    code = ("import sys\nfrom trainer.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n"
            "    print('tensorflow' in sys.modules, stop.code)")
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout == "False 2\n", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert sorted(os.listdir(runs)) == ["mlp"]  # nothing left behind


def test_loading_tensorflow_skips_matplotlib_and_freezes_its_objects_out_of_the_collector():
    # Keras would import pyplot at start-up (~0.8 s of every run) for a helper the trainer never calls; the
    # collector would scan TensorFlow's millions of objects during the import and at every full collection.
    code = ("import gc, sys\nfrom trainer.runtime import load_tensorflow\nload_tensorflow()\nimport trainer.train\n"
            "print('matplotlib' in sys.modules, gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
            "from trainer import analysis\nprint(analysis.plt.figure().dpi > 0, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout == "False True True\nTrue True\n", result.stdout + result.stderr


def test_the_entry_point_takes_sigterm_before_it_imports_the_command_line():
    # Importing the command line and its modules takes ~0.1 s; a SIGTERM then ended the process with 143.
    code = ("import importlib.abc, runpy, signal, sys\n"
            "class Watch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'trainer.cli':\n"
            "            print(signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), flush=True)\n"
            "sys.meta_path.insert(0, Watch())\n"
            "sys.argv = ['trainer', 'data', '--help']\n"
            "runpy.run_module('trainer', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("True\n"), result.stdout[:200] + result.stderr


def test_a_sigterm_the_launcher_held_back_reaches_the_trainer_and_ends_other_commands(tmp_path, data_dir):
    """A launcher that blocks SIGTERM until the trainer takes it (the mask survives exec) closes the window of the
    interpreter's start: the signal, pending from the first instant, stops a training run with 75 and ends a
    command that trains nothing as the signal would (through the installed `mnist-trainer` script)."""
    script = os.path.join(os.path.dirname(sys.executable), "mnist-trainer")
    held = {"preexec_fn": lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})}
    for argv, code in ((["train", "--model", "mlp300", "--epochs", "1", "--data-dir", data_dir], 75),
                       (["evaluate"], -signal.SIGTERM)):
        process = subprocess.Popen([script, *argv, "--output-dir", str(tmp_path), "--run", "r"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **held)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == code, stderr[-2000:]
    assert error_lines(stderr) == [], stderr  # evaluate: ended by the signal before it looked for the run


def _stopped_while_starting(process: subprocess.Popen) -> int | None:
    """The PID of `process`'s child (the first process of a PID namespace `unshare --fork` made), stopped
    (SIGSTOP) once it runs the interpreter, before the trainer takes SIGTERM; None if that moment was missed."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
                child = int(f.read().split()[0])
            if "python" in os.path.basename(os.readlink(f"/proc/{child}/exe")):
                os.kill(child, signal.SIGSTOP)
                return None if catches_sigterm(child) else child
        except (OSError, IndexError):
            pass
        time.sleep(0.0002)
    raise AssertionError("the trainer did not start")


def _terminated_while_starting(start: list[str], args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `start ARGS` as PID 1 of a new PID namespace and send it SIGTERM from outside while its interpreter
    starts (tried again if this busy machine let the moment pass); its exit code and stderr."""
    for attempt in range(5):
        command = ["unshare", "--pid", "--fork", "--kill-child", *start, *args, "--run", f"a{attempt}"]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            pid = _stopped_while_starting(process)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)
                _, stderr = process.communicate(timeout=300)
                return process.returncode, stderr
        finally:
            process.kill()
            process.wait()
    raise AssertionError("the trainer had taken SIGTERM before it could be stopped, five times")


@pytest.mark.skipif(subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode != 0,
                    reason="making a PID namespace (`unshare --pid`) needs root here")
def test_the_images_entrypoint_keeps_a_sigterm_that_pid_1_gets_while_starting(tmp_path, data_dir):
    """As a container's first process (PID 1 of its PID namespace, as in a pod), a SIGTERM from outside that
    arrives while the interpreter starts is dropped by the kernel (no handler yet): started plainly, the trainer
    trains on to the end. Started by the image's ENTRYPOINT, which blocks the signal until the trainer takes it,
    the same signal stops it with 75 at once."""
    environment = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    plain = ["python", "-m", "trainer"]
    entrypoint = image_entrypoint()
    assert entrypoint[-len(plain):] == plain
    for start, code in ((plain, 0), (entrypoint, 75)):
        returncode, stderr = _terminated_while_starting(start, [*_small_run(data_dir), "--output-dir",
                                                                str(tmp_path / start[0])], environment)
        assert returncode == code, (start, stderr[-2000:])
        if code == 75:
            assert error_lines(stderr)[0].startswith("error: interrupted by SIGTERM"), stderr[-2000:]


def _small_run(data_dir: str) -> list[str]:
    return ["train", "--model", "mlp300", "--epochs", "1", "--checkpoint-every", "200", "--data-dir", data_dir,
            "--grace-seconds", "10"]


@pytest.mark.parametrize("target", MOMENTS)
def test_sigterm_at_each_moment_ends_the_run_with_its_exit_code_and_0_only_with_the_run_complete(
        target, concurrent_bucket, data_dir, tmp_path):
    """SIGTERM to a run in a bucket (fake-gcs-server: the attempt is frozen, maybe half-way through a request,
    while the test reads the store), at each moment of its life, once the trainer has taken the signal
    (before that, see the two tests above), the process frozen to read which moment it is in (fault_trials): 75
    within the grace at every moment but the final flush, with the store holding what its one line says it saved
    and not marked finished; 0 at the final flush, the store holding a run whose model evaluates as its
    metrics.json says."""
    output, run = f"gs://{concurrent_bucket}/runs", "r"
    url, args = f"{output}/{run}", trainer_args(output, run, data_dir)
    env, store, attempts = {**os.environ, "TRAINER_JOB": f"runs/{run}"}, GCSStore(f"{output}/{run}"), []

    def attempt() -> Attempt:
        attempts.append(Attempt(args, str(tmp_path / f"attempt{len(attempts)}"), env, run, data_dir))
        return attempts[-1]

    if target == "restore":  # something to restore: an earlier attempt stopped mid-training
        assert inject(attempt(), "mid-training", "sigterm", 0.5, store, 0).code == EXIT_INTERRUPTED
    for _ in range(3):  # a moment this busy machine let pass is aimed at again in a new attempt
        restored, current = shipped_step(store), attempt()
        if target in ("start-up", "restore"):  # from the entry point's first line
            assert wait_until(lambda: catches_sigterm(current.process.pid), 30, current.process, interval=0.001)
        fault = inject(current, target, "sigterm", 0.0, store, restored)
        assert fault is not None, current.stderr()[-2000:]
        if fault.moment == target:
            break
    assert fault.moment == target and fault.handler, dataclasses.asdict(fault)
    stderr = current.stderr()
    assert fault.code == fault.expected == (0 if target == "final flush" else EXIT_INTERRUPTED), \
        (dataclasses.asdict(fault), stderr[-2000:])
    if fault.code == 0:
        assert error_lines(stderr) == [], stderr[-2000:]
        assert evaluates_as_recorded(url, data_dir)
        return
    assert "Traceback" not in stderr and len(error_lines(stderr)) == 1, stderr[-2000:]
    line = error_lines(stderr)[0]
    assert store.read("metrics.json") is None  # not marked finished
    if line.endswith("before training; nothing to save; safe to retry"):
        assert target in ("start-up", "data", "restore") and shipped_step(store) == restored, line
    else:
        step = int(re.fullmatch(rf"error: interrupted by SIGTERM at step (\d+); checkpoint shipped to {url}; safe to "
                                "retry", line).group(1))
        assert shipped_step(store) == step > restored, line


@pytest.mark.parametrize("command", [["trainer", c] for c in ("train", "evaluate", "predict", "analyze", "data", "gpus")]
                         + [["trainer.launch", c] for c in ("submit", "status", "wait", "logs", "tensorboard")])
def test_every_commands_help_fits_a_screen_and_train_groups_its_flags(command):
    result = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "100"}, timeout=60)
    assert result.returncode == 0 and len(result.stdout.splitlines()) <= 65, result.stdout
    if command == ["trainer", "train"]:
        groups = re.findall(r"^([a-z]+):$", result.stdout, re.M)
        assert groups == ["options", "data", "model", "training", "storage", "cluster", "logging"], groups
        assert result.stdout.split("\noptions:\n")[1].split("\n\n")[0].split() == ["-h,", "--help", "show", "this",
                                                                                  "help", "message", "and", "exit"]
