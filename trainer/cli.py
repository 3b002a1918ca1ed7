"""argv -> Config -> one command function. TensorFlow is imported only after the arguments are valid."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any, NoReturn, Sequence

from trainer import config as config_lib
from trainer.config import EXIT_INTERRUPTED, EXIT_PEER_LOST, EXIT_STORE, EXIT_USAGE, ConfigError
from trainer.storage import LocalStore, RunFolder, Store, StoreUnavailable, fetch, open_store

FLAG_HELP = {
    "dataset": f"dataset: {', '.join(config_lib.DATASETS)}",
    "data_dir": "folder for TFDS data and imported IDX files",
    "data_source": "auto (TFDS if prepared, else IDX files / packaged copy, else TFDS download), tfds or idx",
    "augment": "random shifts of up to 2 pixels",
    "model": f"model preset: {', '.join(config_lib.PRESETS)}",
    "optimizer": "sgd or adam",
    "learning_rate": "peak learning rate",
    "momentum": "SGD momentum",
    "schedule": "constant or cosine learning-rate decay",
    "warmup_epochs": "epochs of linear learning-rate warm-up from 0 (before the schedule)",
    "lr_scaling": "none, linear or sqrt: scale the learning rate with --batch-size / the preset's batch size",
    "epochs": "passes over the training set",
    "batch_size": "global batch size, split evenly over replicas",
    "seed": "seed for initialisation, shuffling and augmentation",
    "output_dir": "parent folder of run folders",
    "run": "run folder name; reuse it to resume",
    "checkpoint_every": "steps between checkpoints",
    "steps_per_loop": "steps per tf.function call and per log entry",
    "cpu_replicas": "0: all GPUs (or the CPU); N: N logical CPU devices",
    "precision": "float32, or mixed_float16 (float16 compute on GPUs with dynamic loss scaling)",
    "jit_compile": "XLA-compile the forward and backward pass (faster on GPUs, slower on CPUs)",
    "peer_timeout": "multi-worker: seconds without heartbeats after which a peer is lost (exit 69)",
    "startup_timeout": "multi-worker: seconds to wait at start for every peer to join (then exit 69)",
    "scratch_dir": "fast local folder for the run while it trains ('' = system temp dir)",
    "ship_every": "seconds between background uploads to the output dir",
    "grace_seconds": "after SIGTERM: save, upload and exit within this many seconds",
    "store_timeout": "seconds the final upload retries an unreachable store before giving up",
}


PEER_LOST_HOLD = 5.0  # seconds a survivor waits after reporting a lost peer before it exits


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line to stderr and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, named after it; unset flags fall back to the model's preset."""
    for section in config_lib.SECTION_CLASSES.values():
        for field in dataclasses.fields(section):
            flag = config_lib.flag(field.name)
            help_ = f"{FLAG_HELP[field.name]} (default: {_preset_hint(field)})"
            if field.type == "bool":
                parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, help=help_)
            else:
                kind = {"int": int, "float": float}.get(str(field.type), str)
                parser.add_argument(flag, dest=field.name, type=kind, help=help_)


def _preset_hint(field: dataclasses.Field) -> str:
    default = repr(field.default) if field.default != "" else "generated"
    per_model = [f"{m}: {p[field.name]}" for m, p in config_lib.PRESETS.items() if field.name in p]
    if len(per_model) == len(config_lib.PRESETS):
        return ", ".join(per_model)
    return "; ".join([default] + per_model)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default=config_lib.RunConfig.output_dir, help="parent folder of run folders")
    parser.add_argument("--run", required=True, help="run folder name")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m trainer` parser with its subcommands."""
    parser = Parser(prog="python -m trainer", description="Train and evaluate MNIST classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train (or resume) a run, evaluate and export it")
    _add_config_flags(train)

    evaluate = commands.add_parser("evaluate", help="evaluate a run's exported model on the test set")
    _add_run_flags(evaluate)
    evaluate.add_argument("--data-dir", help="override the data dir saved with the run")

    predict = commands.add_parser("predict", help="classify PNG images with an exported model")
    predict.add_argument("images", nargs="+", help="PNG files (grayscale 28x28; others are resized)")
    predict.add_argument("--model-dir", help="an exported model folder (or give --output-dir and --run)")
    predict.add_argument("--output-dir", default=config_lib.RunConfig.output_dir)
    predict.add_argument("--run", help="run whose model/ to use")

    analyze = commands.add_parser("analyze", help="plots and analyses of a trained run into <run>/analysis/")
    _add_run_flags(analyze)
    analyze.add_argument("--data-dir", help="override the data dir saved with the run")
    analyze.add_argument("--l2", type=float, default=0.25, help="L2 penalty of the optimal-input search")

    data = commands.add_parser("data", help="import and verify datasets; print where they come from")
    data.add_argument("--dataset", choices=config_lib.DATASETS + ("all",), default="all")
    data.add_argument("--data-dir", default=config_lib.DataConfig.data_dir)
    data.add_argument("--data-source", choices=config_lib.DATA_SOURCES, default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m trainer`."""
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "analyze": cmd_analyze,
                "data": cmd_data}[args.command](args)
    except ConfigError as error:
        fail(str(error))
    except StoreUnavailable as error:
        fail(str(error), EXIT_STORE)


def cmd_train(args: argparse.Namespace) -> int:
    """Train, print a one-line summary."""
    fields = {k: v for k, v in vars(args).items() if k in config_lib.FIELD_SECTION}
    config = config_lib.build_config(fields)
    from trainer.distribute import PeerLost, make_strategy  # TensorFlow starts here, after validation
    from trainer.train import Interrupted, train_and_evaluate

    try:
        strategy = make_strategy(config.runtime)  # before any other TF op: may split the CPU
        metrics = train_and_evaluate(config, strategy, log=lambda m: print(m, file=sys.stderr))
    except Interrupted as stop:
        fail(str(stop), EXIT_INTERRUPTED)
    except PeerLost as lost:
        print(f"error: {lost}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # A peer that crashed must fail its pod before the survivors fail theirs: the group's failure policy
        # acts on the first failure, and counts a crash (so a crash loop ends) but not a lost peer.
        time.sleep(PEER_LOST_HOLD)
        # Not sys.exit: TensorFlow's teardown would wait at the coordination service's shutdown barrier
        # for the peer that is gone.
        os._exit(EXIT_PEER_LOST)
    folder = f"{config.run.output_dir.rstrip('/')}/{config.run.run}"
    print(f"test accuracy {metrics['test_accuracy']:.2%}  test loss {metrics['test_loss']:.4f}  "
          f"{metrics['steps']} steps on {metrics['replicas']} replica(s)  run folder: {folder}")
    return 0


def _run_folder(store: Store, prefixes: tuple[str, ...]) -> RunFolder:
    """A local view of a run: the folder itself, or the `prefixes` fetched from gs:// into a temp dir."""
    if isinstance(store, LocalStore):
        if not os.path.isdir(store.root):
            raise ConfigError(f"no run folder {store.root}")
        return RunFolder(store.root)
    store.check()
    local = RunFolder(tempfile.mkdtemp(prefix="mnist-trainer-"))
    if not [name for prefix in prefixes for name in fetch(store, prefix, local.root)]:
        raise ConfigError(f"no run at {store.url}")
    return local


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate the exported model on the full test set; print the metrics as JSON."""
    folder = _run_folder(open_store(args.output_dir, args.run), ("config.json", "model/"))
    saved = folder.read_json("config.json")
    if saved is None or not os.path.isdir(folder.model):
        raise ConfigError(f"{folder.root} has no config.json and exported model/ (did training finish?)")
    config = config_lib.config_from_dict(saved)
    data_config = dataclasses.replace(config.data, data_dir=args.data_dir or config.data.data_dir)
    from trainer.data import load_split
    from trainer.evaluate import evaluate_serving
    from trainer.export import load_serving

    metrics = evaluate_serving(load_serving(folder.model), load_split(data_config, "test"))
    print(json.dumps(metrics))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Print `file<TAB>class<TAB>probability` for each PNG."""
    if not args.model_dir and not args.run:
        raise ConfigError("give --model-dir, or --output-dir and --run")
    model_dir = args.model_dir or _run_folder(open_store(args.output_dir, args.run), ("model/",)).model
    if not os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        raise ConfigError(f"no exported model in {model_dir}")
    for path in args.images:
        if not os.path.isfile(path):
            raise ConfigError(f"no such image {path}")
    from trainer.export import predict_files

    try:
        results = predict_files(model_dir, list(args.images))
    except Exception as error:  # tf.errors.InvalidArgumentError for non-PNG bytes, among others
        raise ConfigError(f"cannot classify the images: {str(error).splitlines()[0]}") from error
    for path, label, probability in results:
        print(f"{path}\t{label}\t{probability:.4f}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Write the analyses of a run (local or gs://) and print where they are."""
    if args.l2 < 0:
        raise ConfigError(f"--l2 must be >= 0, got {args.l2}")
    store = open_store(args.output_dir, args.run)
    folder = _run_folder(store, ("config.json", "metrics.json", "checkpoints/", "logs/"))
    from trainer.analysis import analyze

    summary = analyze(folder, args.l2, args.data_dir)
    if not isinstance(store, LocalStore):
        for prefix in ("analysis", os.path.join("logs", "analysis")):
            for base, _, files in os.walk(folder.path(prefix)):
                for file in files:
                    path = os.path.join(base, file)
                    store.upload(path, os.path.relpath(path, folder.root).replace(os.sep, "/"))
    print(f"{len(summary['files'])} plots in {store.url}/analysis/ (and in TensorBoard under logs/analysis)")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Import (if needed) and verify each dataset; print its source and sizes."""
    from trainer.data import load_split

    names = config_lib.DATASETS if args.dataset == "all" else (args.dataset,)
    for name in names:
        data_config = config_lib.DataConfig(dataset=name, data_dir=args.data_dir, data_source=args.data_source)
        train, test = load_split(data_config, "train"), load_split(data_config, "test")
        print(f"{name}: {len(train)} train + {len(test)} test images, verified, from {train.source}")
    return 0
