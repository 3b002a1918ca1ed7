"""train_and_evaluate(run, strategy) -> metrics: load the data of a run opened for training, build the learner,
run the loop with its ordered actions, write the metrics and ship the run."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import summary as hparams_summary

from trainer import actions, loop
from trainer.config import ConfigError, check_replicas
from trainer.datasets import load_split
from trainer.distribute import PeerLost, any_worker, cluster_of, describe, peer_failures, same_on_all_workers
from trainer.learner import Learner
from trainer.preemption import Preemption
from trainer.run_dir import HPARAMS_LOG, HPARAMS_SUFFIX, TrainingRun
from trainer.shipper import Shipper
from trainer.sigterm import StopSignal
from trainer.storage import StoreUnavailable

SAMPLE_IMAGES = 16  # training images shown in TensorBoard
# What the HParams dashboard shows of a run: the settings that change what is learned (and `replicas`), the first
# five ticked when it opens; its metrics, the test run's percentage and loss.
HPARAMS = ("model", "dataset", "batch_size", "learning_rate", "epochs", "optimizer", "schedule", "augment",
           "precision", "replicas")
HPARAMS_TICKED = 5
HPARAMS_METRICS = (("accuracy_percent", "test accuracy (%)"), ("loss", "test loss"))


def train_and_evaluate(run: TrainingRun, strategy: tf.distribute.Strategy, stop: StopSignal | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) a run opened by run_dir.open_for_training, evaluate and export it; return its metrics.
    `stop` is the entered StopSignal of the process (entered here if None). The run is closed at the end."""
    started = time.time()
    config = run.config
    with contextlib.nullcontext(stop) if stop else StopSignal() as stop, contextlib.closing(run):
        train, test = load_split(config.data, "train"), load_split(config.data, "test")
        stop.check("while loading the data")
        schedule = loop.Schedule.of(config.run, len(train))
        finished = run.finished(schedule.total_steps)
        if finished is not None:
            log(f"run {run.url} already finished {schedule.total_steps} steps; nothing to train")
            return finished
        chief = run.task.chief  # decided once, from the environment: only the chief writes logs and ships the run
        shipper: Shipper | None = None
        # A lost peer anywhere below (collectives, the coordination service) ends this worker, not the group's
        # run; the chief first commits what it saved.
        commit_saved = lambda: shipper is not None and shipper.flush(config.run.grace_seconds)  # noqa: E731
        with peer_failures(cluster_of(strategy), on_lost=commit_saved):
            check_replicas(config.run.batch_size, strategy.num_replicas_in_sync)
            learner = Learner(config, strategy, train, test, schedule, run.local.checkpoints)
            start_step, unreadable = learner.checkpoints.restore(run.url, log)
            # Damaged checkpoints are no longer named by the pointer (and deleted) once a new one is committed.
            shipped = [name for name in run.shipped if name not in unreadable]
            if not same_on_all_workers(strategy, start_step):
                raise PeerLost(f"the workers restored different checkpoints of {run.url} (worker 0's shipping was "
                               "still under way?); the group must restart")
            if start_step > schedule.total_steps:
                raise ConfigError(f"run {run.url} already trained {start_step} steps, more than "
                                  f"{config.run.epochs} epochs ({schedule.total_steps} steps)")
            history = run.start(start_step)
            stop.check("while restoring the run")
            if start_step:
                log(f"resuming {run.url} from step {start_step} of {schedule.total_steps}")
            shipper = Shipper(run.local, run.store, config.run.ship_every, shipped, log, run.lease) if chief else None
            with shipper or contextlib.nullcontext():
                summaries, evaluation, preemption = _train(run, learner, schedule, start_step, history, chief, stop,
                                                           shipper)
                metrics = {
                    **evaluation.last,
                    "steps": schedule.total_steps,
                    "epochs": config.run.epochs,
                    "replicas": strategy.num_replicas_in_sync,
                    "strategy": describe(strategy),
                    "global_batch_size": config.run.batch_size,
                    "examples_per_sec": summaries.examples_per_sec(),
                    "wall_seconds": round(time.time() - started, 1),
                    "resumed_from_step": start_step,
                    "model": config.model.model,
                    "parameters": learner.model.count_params(),
                    "dataset": config.data.dataset,
                    "data_source": train.source,
                    "history": evaluation.history,
                }
                run.finish(metrics)
                if shipper and not shipper.flush(config.run.store_timeout, preemption.limit):
                    if shipper.lost is not None:
                        raise shipper.lost
                    if stop.requested:
                        preemption.stop_at(schedule.total_steps)
                    raise StoreUnavailable(f"could not ship the run to {run.url} ({shipper.last_error}); "
                                           f"everything is kept in {run.local.root}")
    return metrics


def _train(run: TrainingRun, learner: Learner, schedule: loop.Schedule, start_step: int,
           history: list[dict[str, Any]], chief: bool, stop: StopSignal,
           shipper: Shipper | None) -> tuple[actions.Summaries, actions.Evaluation, Preemption]:
    """The loop from start_step with its actions, in order; returns the summaries, evaluation and preemption
    actions."""
    config = run.config
    train_writer = actions.summary_writer(run.local.path("logs", "train"), chief)
    test_writer = actions.summary_writer(run.local.path("logs", "test"), chief)
    if chief:
        _log_hparams(run, learner.strategy.num_replicas_in_sync)
    if start_step == 0 and chief:
        with train_writer.as_default(step=0):
            tf.summary.image("inputs", learner.train_split.images[:SAMPLE_IMAGES].astype(np.float32) / 255.0,
                             max_outputs=SAMPLE_IMAGES)
    learner.begin(start_step)
    console = actions.Console(schedule.total_steps, start_step, chief, config.run.log_every)
    try:
        summaries = actions.Summaries(train_writer, lambda: learner.learning_rate, console)
        evaluation = actions.Evaluation(learner.evaluate, test_writer, console, config.run.epochs, history,
                                        run.record_history if chief else None)
        checkpointing = actions.Checkpointing(learner.checkpoints, config.run.checkpoint_every, shipper,
                                              lambda: (train_writer.flush(), test_writer.flush()))
        preemption = Preemption(stop, lambda flag: any_worker(learner.strategy, flag), checkpointing, shipper,
                                config.run.grace_seconds, run.local.root)
        # Export before preemption: a SIGTERM during the final evaluation stops after it (skipping the export),
        # one during the export after it.
        export = actions.Export(learner.model, run.local.model, preemption.requested_anywhere)
        loop.run(learner.train_steps, schedule, start_step,
                 [summaries, evaluation, checkpointing, export, preemption])
    finally:
        console.close()
    return summaries, evaluation, preemption


def _log_hparams(run: TrainingRun, replicas: int) -> None:
    """This attempt's hyper-parameters for the HParams dashboard, in the test log: its session is the run's test
    run, whose accuracy and loss become the session's metrics. TensorBoard keeps the first hparams of a run, so
    an earlier attempt's (a resume may change --epochs) are removed first."""
    run.drop_hparams()
    with tf.summary.create_file_writer(run.local.path(*HPARAMS_LOG), filename_suffix=HPARAMS_SUFFIX).as_default():
        values = {**{k: v for k, v in run.config.flat().items() if k in HPARAMS}, "replicas": replicas}
        # TensorBoard shows every number with three decimals: whole numbers go as text ("64", not "64.000").
        shown = {k: str(v) if type(v) is int else v for k, v in values.items()}
        # The dashboard lists first, and ticks, the hparams marked as differing between runs (then by name): these
        # are the ones a comparison of runs is about.
        infos = [api_pb2.HParamInfo(name=name, differs=i < HPARAMS_TICKED) for i, name in enumerate(HPARAMS)]
        metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=text)
                   for tag, text in HPARAMS_METRICS]
        tf.summary.experimental.write_raw_pb(hparams_summary.experiment_pb(infos, metrics).SerializeToString(), step=0)
        hparams_api.hparams(shown, trial_id=run.config.run.run)
