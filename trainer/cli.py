"""argv -> Config -> one command function. TensorFlow is imported only after the arguments are valid; a run
folder is opened through run_dir, whatever its store."""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import sys
import time
from typing import NoReturn, Sequence

from trainer import config as config_lib
from trainer import run_dir
from trainer.cluster import this_task
from trainer.config import (EXIT_NO_GPU, EXIT_PEER_LOST, EXIT_STORE, EXIT_USAGE, ConfigError, Parser, TrainerError,
                            add_flags, config_from_args, fail, given_flags)
from trainer.sigterm import StopSignal
from trainer.runtime import load_tensorflow, set_tensorflow_env
from trainer.storage import disk_full

PEER_LOST_HOLD = 5.0  # seconds a survivor waits after reporting a lost peer before it exits


def _add_run_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--output-dir", default=config_lib.RunConfig.output_dir,
                        help="parent folder of run folders, or gs://BUCKET/PREFIX (default: %(default)s)")
    parser.add_argument("--run", required=required,
                        help="run folder name" + (" (required)" if required else " (default: none)"))


def _add_data_dir_override(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="read the test data from here (default: the data dir saved with the run)")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, with room for a flag and its metavar before the help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m trainer` parser with its subcommands."""
    parser = Parser(prog="python -m trainer", description="Train and evaluate MNIST classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def verbose(where: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        where.add_argument("--verbose", action="store_true",
                           help="show TensorFlow's own start-up and C++ logs (default: off)")

    def command(name: str, text: str, logging: bool = True) -> argparse.ArgumentParser:
        # One line per flag where its help fits: the help of every command fits a screen.
        sub = commands.add_parser(name, help=text, description=text, formatter_class=HelpFormatter,
                                  usage=f"python -m trainer {name} [FLAG ...]{' IMAGE ...' if name == 'predict' else ''}")
        if logging:
            verbose(sub)
        return sub

    train = command("train", "train (or resume) a run, evaluate and export it; to resume, give the same "
                             "--output-dir and --run (other flags only to change them, e.g. --epochs)", logging=False)
    verbose(add_flags(train)["logging"])

    evaluate = command("evaluate", "evaluate a run's exported model on the test set; prints JSON")
    _add_run_flags(evaluate)
    _add_data_dir_override(evaluate)

    predict = command("predict", "classify images of digits with an exported model; prints "
                                 "file<TAB>class<TAB>probability<TAB>conversions made")
    predict.add_argument("images", nargs="+", help=f"image files ({', '.join(config_lib.IMAGE_TYPES)}), folders "
                         "of them, or glob patterns; other sizes are resized, colour made grey")
    predict.add_argument("--polarity", choices=config_lib.POLARITIES, default="auto",
                         help="light-on-dark is MNIST's own; auto inverts images whose border is light "
                              "(default: %(default)s)")
    predict.add_argument("--model-dir", help="an exported model folder (default: <output-dir>/<run>/model)")
    _add_run_flags(predict, required=False)

    analyze = command("analyze", "plots and analyses of a trained run into <run>/analysis/")
    _add_run_flags(analyze)
    _add_data_dir_override(analyze)
    analyze.add_argument("--l2", type=float, default=0.25,
                         help="L2 penalty of the optimal-input search (default: %(default)s)")

    data = command("data", "import and verify datasets; print where they come from")
    data.add_argument("--dataset", choices=config_lib.DATASETS + ("all",), default="all",
                      help="which dataset (default: %(default)s)")
    data.add_argument("--data-dir", default=config_lib.DataConfig.data_dir,
                      help="folder for TFDS data and imported IDX files (default: %(default)s)")
    data.add_argument("--data-source", choices=config_lib.DATA_SOURCES, default="auto",
                      help="where to read from; auto: TFDS if prepared, else IDX files / packaged copy, "
                           "else a TFDS download (default: %(default)s)")

    command("gpus", "check, with or without a GPU, each CUDA library TensorFlow loads on a GPU: found where "
                    "TensorFlow looks, loaded, of a version it was built for; then the node's driver. Exit "
                    f"{EXIT_NO_GPU} unless every library but the driver is usable")
    return parser


def main(argv: Sequence[str] | None = None, stop: StopSignal | None = None) -> int:
    """Run one command of `python -m trainer`; `stop` is the entry point's StopSignal (taken here if None)."""
    stop = stop or StopSignal().install()
    args = build_parser().parse_args(argv)
    set_tensorflow_env(args.verbose)
    try:
        if args.command == "train":
            return cmd_train(args, stop)
        stop.release()  # nothing to save: SIGTERM ends the other commands as it always would
        return {"evaluate": cmd_evaluate, "predict": cmd_predict, "analyze": cmd_analyze,
                "data": cmd_data, "gpus": cmd_gpus}[args.command](args)
    except TrainerError as error:
        _fail(str(error), error.exit_code)
    except Exception as error:
        if not disk_full(error):
            raise
        path = getattr(error, "filename", None) or (re.findall(r"(?:^|\s)(/[^\s;:]+)", str(error)) or ["?"])[0]
        _fail(f"no space left on the disk of {path}: free space or give --scratch-dir a larger disk (the store "
              "keeps what was shipped; a re-run resumes from it)", EXIT_STORE)


def _fail(message: str, code: int) -> NoReturn:
    """The one `error:` line and exit. Everything is written and closed by then; once TensorFlow is loaded, the
    interpreter's teardown takes a second or more on a loaded node, which would count against a SIGTERM's grace
    period, so the process ends at once."""
    fail(message, code, now="tensorflow" in sys.modules)


def cmd_train(args: argparse.Namespace, stop: StopSignal) -> int:
    """Train, print a one-line summary. SIGTERM is a flag (`stop`), checked at the end of every phase."""
    # Everything that needs no TensorFlow is decided first: the flags, the store, a resume's settings.
    run = run_dir.open_for_training(config_from_args(args), this_task(), given_flags(args), _warn, stop.check)
    try:
        # train_and_evaluate closes the run when it ends; this closes it (once more: closing is idempotent) when
        # the process stops before then, having written nothing: the lease goes back at once, so a re-run, or the
        # job's next attempt, takes the run without waiting for it to go stale (GPUs missing, SIGTERM while
        # starting, a peer that never joined).
        with contextlib.closing(run):
            stop.check("while opening the run")
            from trainer.datasets import read_ahead

            read_ahead(run.config.data)
            load_tensorflow(args.verbose)
            from trainer.distribute import make_strategy
            from trainer.train import train_and_evaluate

            strategy = make_strategy(run.config.runtime)  # before any other TF op: may split the CPU
            # The multi-worker runtime installs a SIGTERM handler of its own (TensorFlow's preemption notifier, in
            # C++): without this, worker 0 trained on through a SIGTERM (seen in the group fault trials).
            stop.install()
            stop.check("while starting TensorFlow")
            metrics = train_and_evaluate(run, strategy, stop, log=_warn)
    except TrainerError as error:
        if error.exit_code == EXIT_PEER_LOST:
            _exit_lost(error)
        raise
    print(f"test accuracy {metrics['test_accuracy']:.2%}  test loss {metrics['test_loss']:.4f}  "
          f"{metrics['steps']} steps on {metrics['replicas']} replica(s)  run folder: {run.url}", flush=True)
    sys.stderr.flush()
    # Everything is written, shipped and flushed. Python's own shutdown would hand SIGTERM back to its default
    # action while TensorFlow tears down (a second or so): a signal then would turn a finished run's exit into 143.
    os._exit(0)


def _exit_lost(lost: TrainerError) -> NoReturn:
    """Report a lost peer and end the process with its code."""
    print(f"error: {lost}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # A peer that crashed must fail its pod before the survivors fail theirs: the group's failure policy
    # acts on the first failure, and counts a crash (so a crash loop ends) but not a lost peer.
    time.sleep(PEER_LOST_HOLD)
    # Not sys.exit: TensorFlow's teardown would wait at the coordination service's shutdown barrier
    # for the peer that is gone.
    os._exit(lost.exit_code)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate the exported model on the full test set; print the metrics as JSON."""
    run = run_dir.open_for_reading(args.output_dir, args.run, (run_dir.CONFIG, f"{run_dir.MODEL}/"))
    config = run.config(args.data_dir)
    if not run.folder.has_model():
        raise ConfigError(f"{run.store.url} has no exported {run_dir.MODEL}/ (did training finish?)")
    from trainer.datasets import load_split, read_ahead

    read_ahead(config.data, ("test",))
    load_tensorflow(args.verbose)
    from trainer.evaluate import evaluate_serving
    from trainer.export import load_serving

    metrics = evaluate_serving(load_serving(run.folder.model), load_split(config.data, "test"))
    print(json.dumps(metrics))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Print `file<TAB>class<TAB>probability<TAB>conversions` for each image; one error line per image that
    cannot be classified (the others still are), and exit 2 if there was any."""
    if not args.model_dir and not args.run:
        raise ConfigError("give --model-dir, or --output-dir and --run")
    if args.model_dir:
        model_dir = args.model_dir
    else:
        model_dir = run_dir.open_for_reading(args.output_dir, args.run, (f"{run_dir.MODEL}/",)).folder.model
    if not run_dir.is_complete_model(model_dir):
        raise ConfigError(f"no exported model in {model_dir}")
    paths, failed = _image_paths(args.images)
    if paths:
        load_tensorflow(args.verbose)
        from trainer.export import percent, predict_files

        for result in predict_files(model_dir, paths, args.polarity):
            if result.error is not None:
                failed += 1
                print(f"error: {result.path}: {result.error}", file=sys.stderr)
            else:
                print(f"{result.path}\t{result.label}\t{percent(result.probability)}\t"
                      f"{', '.join(result.notes) or 'none'}", flush=True)
    return EXIT_USAGE if failed else 0


def _image_paths(given: list[str]) -> tuple[list[str], int]:
    """The image files that `given` names (files, folders of images, glob patterns), and how many named nothing
    (each reported in an error line)."""
    paths, failed = [], 0
    for item in given:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(config_lib.IMAGE_TYPES))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p)) if any(c in item for c in "*?[") else []
        if not found:
            failed += 1
            kind = "folder has no images" if os.path.isdir(item) else "no such image"
            print(f"error: {item}: {kind}", file=sys.stderr)
        paths += found
    return paths, failed


def cmd_analyze(args: argparse.Namespace) -> int:
    """Write the analyses of a run (local or gs://) and print where they are."""
    if args.l2 < 0:
        raise ConfigError(f"--l2 must be >= 0, got {args.l2}")
    run = run_dir.open_for_reading(args.output_dir, args.run, (
        run_dir.CONFIG, run_dir.HISTORY, run_dir.METRICS, f"{run_dir.CHECKPOINTS}/"))
    load_tensorflow(args.verbose)
    from trainer.analysis import OUTPUTS, analyze

    summary = analyze(run.folder, run.config(args.data_dir), args.l2)
    run.publish(*OUTPUTS)
    print(f"{len(summary['files'])} plots in {run.store.url}/{run_dir.ANALYSIS}/ "
          f"(and in TensorBoard under {run_dir.LOGS}/{run_dir.ANALYSIS})")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Import (if needed) and verify each dataset; print its source and sizes."""
    load_tensorflow(args.verbose)
    from trainer.datasets import load_split

    names = config_lib.DATASETS if args.dataset == "all" else (args.dataset,)
    for name in names:
        data_config = config_lib.DataConfig(dataset=name, data_dir=args.data_dir, data_source=args.data_source)
        train, test = load_split(data_config, "train"), load_split(data_config, "test")
        print(f"{name}: {len(train)} train + {len(test)} test images, verified, from {train.source}")
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    """Print one line per CUDA library TensorFlow needs on a GPU, and the driver; exit 71 unless every library is
    usable (the driver may be missing: it comes from the node)."""
    load_tensorflow(args.verbose)
    from trainer.gpus import check, report

    lines, usable = report(check())
    print("\n".join(lines))
    return 0 if usable else EXIT_NO_GPU
