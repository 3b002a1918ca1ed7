"""train_and_evaluate(config) -> metrics: the tf.function loop, checkpoints, TensorBoard, export."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api
from tqdm import tqdm

from trainer import data as data_lib
from trainer.checkpoints import Checkpoints, StopSignal
from trainer.config import Config, ConfigError, config_from_dict, resume_conflicts
from trainer.distribute import (PeerLost, any_worker, cluster_of, describe, is_chief, make_strategy, peer_failures,
                                same_on_all_workers)
from trainer.evaluate import make_evaluator
from trainer.export import export_model
from trainer.models import build_model
from trainer.optimizers import build_optimizer
from trainer.shipper import Shipper, restore_run
from trainer.storage import RunFolder, StoreUnavailable, open_store

SAMPLE_IMAGES = 16  # training images shown in TensorBoard


class Interrupted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; re-running resumes it."""

    def __init__(self, step: int, shipped: bool, where: str) -> None:
        state = "shipped to" if shipped else "saved locally (could not reach the store in time) in"
        super().__init__(f"interrupted by SIGTERM at step {step}; checkpoint {state} {where}; safe to retry")
        self.step = step


def scratch_folder(config: Config) -> RunFolder:
    """The local folder a run trains in: `<scratch_dir or system temp>/mnist-trainer/<run>`."""
    base = config.run.scratch_dir or os.path.join(tempfile.gettempdir(), "mnist-trainer")
    return RunFolder(os.path.join(base, config.run.run))


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume from the store) the configured run, evaluate and export it; return its metrics."""
    started = time.time()
    with StopSignal() as stop:
        store = open_store(config.run.output_dir, config.run.run, min(60.0, config.run.store_timeout))
        store.check()
        # The store is the truth: scratch is a cache that starts empty and is filled from the store.
        local = scratch_folder(config)
        shutil.rmtree(local.root, ignore_errors=True)
        shipped = restore_run(store, local)
        saved = local.read_json("config.json")
        if saved is not None:
            conflicts = resume_conflicts(config_from_dict(saved), config)
            if conflicts:
                raise ConfigError(f"run {store.url} was started with other settings ({'; '.join(conflicts)})")

        train = data_lib.load_split(config.data, "train")
        test = data_lib.load_split(config.data, "test")
        global_batch = config.run.batch_size
        per_epoch = data_lib.steps_per_epoch(len(train), global_batch)
        total_steps = per_epoch * config.run.epochs
        finished = local.read_json("metrics.json")
        if finished is not None and finished.get("steps") == total_steps:
            log(f"run {store.url} already finished {total_steps} steps; nothing to train")
            return finished

        strategy = strategy or make_strategy(config.runtime)
        cluster = cluster_of(strategy)
        shipper: Shipper | None = None
        # A lost peer anywhere below (collectives, the coordination service) ends this worker, not the group's
        # run; the chief first commits what it saved.
        commit_saved = lambda: shipper is not None and shipper.flush(config.run.grace_seconds)  # noqa: E731
        with peer_failures(cluster, on_lost=commit_saved):
            if global_batch % strategy.num_replicas_in_sync:
                raise ConfigError(f"global --batch-size {global_batch} is not divisible by "
                                  f"{strategy.num_replicas_in_sync} replicas")
            keras.utils.set_random_seed(config.run.seed)
            with strategy.scope():
                model = build_model(config.model.model, config.runtime.precision)
                optimizer = build_optimizer(config.optimizer, per_epoch, total_steps,
                                            loss_scaling=config.runtime.precision == "mixed_float16")
                optimizer.build(model.trainable_variables)
            checkpoints = Checkpoints(local.checkpoints, model, optimizer)
            try:
                start_step = checkpoints.restore()
            except AssertionError as error:
                raise ConfigError(f"checkpoint of {store.url} does not fit model {config.model.model}") from error
            if not same_on_all_workers(strategy, start_step):
                raise PeerLost(f"the workers restored different checkpoints of {store.url} (worker 0's shipping was "
                               "still under way?); the group must restart")
            if start_step > total_steps:
                raise ConfigError(f"run {store.url} already trained {start_step} steps, more than "
                                  f"{config.run.epochs} epochs ({total_steps} steps)")
            local.write_json("config.json", config.to_dict())
            if start_step:
                log(f"resuming {store.url} from step {start_step} of {total_steps}")

            # Every worker trains and saves; only the chief's folder is shipped to the store.
            chief = is_chief(strategy)
            shipper = Shipper(local, store, config.run.ship_every, shipped, log) if chief else None
            with shipper or contextlib.nullcontext():
                loop = _Loop(config, strategy, model, optimizer, checkpoints, shipper, stop, local)
                evaluate = make_evaluator(strategy, model, test)
                chunk_times, last_eval = loop.run(train, evaluate, start_step, per_epoch, total_steps)
                final = last_eval or evaluate()
                export_model(model, local.model)
                metrics = {
                    **final,
                    "steps": total_steps,
                    "epochs": config.run.epochs,
                    "replicas": strategy.num_replicas_in_sync,
                    "strategy": describe(strategy),
                    "global_batch_size": global_batch,
                    "examples_per_sec": _throughput(chunk_times),
                    "wall_seconds": round(time.time() - started, 1),
                    "resumed_from_step": start_step,
                    "model": config.model.model,
                    "parameters": model.count_params(),
                    "dataset": config.data.dataset,
                    "data_source": train.source,
                }
                local.write_json("metrics.json", metrics)
                if shipper and not shipper.flush(config.run.store_timeout):
                    raise StoreUnavailable(f"could not ship the run to {store.url} ({shipper.last_error}); "
                                           f"everything is kept in {local.root}")
    return metrics


class _Loop:
    """The training loop: chunks of steps, logging, per-epoch evaluation, checkpoints, SIGTERM."""

    def __init__(self, config: Config, strategy: tf.distribute.Strategy, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, checkpoints: Checkpoints, shipper: Shipper | None,
                 stop: StopSignal, local: RunFolder) -> None:
        self.config, self.strategy, self.model, self.optimizer = config, strategy, model, optimizer
        self.checkpoints, self.shipper, self.stop, self.local = checkpoints, shipper, stop, local

    def run(self, train: data_lib.Split, evaluate: Callable[[], dict[str, Any]], start_step: int, per_epoch: int,
            total_steps: int) -> tuple[list[tuple[int, float]], dict[str, Any] | None]:
        """Train from start_step to total_steps; return per-call timings and the last evaluation."""
        config, global_batch = self.config, self.config.run.batch_size
        chief = self.shipper is not None
        train_writer = _writer(self.local.path("logs", "train"), chief)
        test_writer = _writer(self.local.path("logs", "test"), chief)
        if start_step == 0 and chief:
            _log_run_start(self.local.logs, train_writer, config, train)
        # Images live on every replica's device; the pipeline only feeds example indices.
        resident = data_lib.resident_split(self.strategy, train)
        dataset = self.strategy.distribute_datasets_from_function(data_lib.train_index_fn(
            len(train), global_batch, config.run.epochs, config.run.seed, start_step, config.data.augment))
        iterator = iter(dataset)
        train_chunk = _make_train_chunk(self.strategy, self.model, self.optimizer, global_batch, resident,
                                        config.runtime.jit_compile)

        step, last_eval = start_step, None
        chunk_times: list[tuple[int, float]] = []  # (examples, seconds) per tf.function call
        with _progress(total_steps, start_step, chief) as bar:
            while step < total_steps:
                epoch_end = (step // per_epoch + 1) * per_epoch
                n = min(config.run.steps_per_loop, epoch_end - step)
                tick = time.perf_counter()
                loss_sum, correct = (float(t) for t in train_chunk(iterator, tf.constant(n)))
                seconds = time.perf_counter() - tick
                previous, step = step, step + n
                chunk_times.append((n * global_batch, seconds))
                mean_loss, accuracy = loss_sum / (n * global_batch), correct / (n * global_batch)
                learning_rate = float(tf.convert_to_tensor(self.optimizer.learning_rate))
                _write_scalars(train_writer, step, loss=mean_loss, accuracy=accuracy,
                               learning_rate=learning_rate, examples_per_sec=n * global_batch / seconds)
                bar.update(n)
                bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{accuracy:.4f}", refresh=False)
                epoch = step // per_epoch
                if step == epoch_end:
                    last_eval = evaluate()
                    _write_scalars(test_writer, step, loss=last_eval["test_loss"],
                                   accuracy=last_eval["test_accuracy"])
                    bar.write(f"epoch {epoch}/{config.run.epochs}: test accuracy "
                              f"{last_eval['test_accuracy']:.4f} loss {last_eval['test_loss']:.4f}", file=sys.stderr)
                every = config.run.checkpoint_every
                stopping = any_worker(self.strategy, self.stop.requested)  # all workers stop at one step
                if step == epoch_end or step // every > previous // every or stopping:
                    train_writer.flush(), test_writer.flush()
                    saved = self.checkpoints.save(step, epoch)
                    if self.shipper:
                        self.shipper.ship_checkpoint(saved)
                    if stopping:
                        self._interrupted(step)
        train_writer.close(), test_writer.close()
        return chunk_times, last_eval

    def _interrupted(self, step: int) -> None:
        if self.shipper is None:
            raise Interrupted(step, False, self.local.root)
        shipped = self.shipper.flush(self.stop.remaining(self.config.run.grace_seconds))
        raise Interrupted(step, shipped, self.shipper.store.url if shipped else self.local.root)


def _make_train_chunk(strategy: tf.distribute.Strategy, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                      global_batch: int, resident: tf.distribute.DistributedValues,
                      jit_compile: bool = False) -> Callable[..., Any]:
    """A tf.function running `steps` synchronous training steps on batches of indices into the
    replica-resident split; returns (summed loss, correct)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def gradients(images: tf.Tensor, labels: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = loss_fn(labels, logits)
            # Scale by the global batch: gradients summed over replicas give the batch mean.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)  # the loss itself unless float16 loss scaling is on
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1), labels), tf.float32))
        return tape.gradient(scaled, model.trainable_variables), tf.reduce_sum(per_example), correct

    if jit_compile:
        # XLA fuses the forward and backward pass; the update (with its cross-replica all-reduce) stays outside.
        gradients = tf.function(gradients, jit_compile=True)

    def replica_step(split: tuple[tf.Tensor, tf.Tensor], batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        grads, loss_sum, correct = gradients(*data_lib.gather_batch(*split, batch))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss_sum, correct

    @tf.function
    def train_chunk(iterator: Any, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss_sum, correct = tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(steps):
            loss, right = strategy.run(replica_step, args=(resident, next(iterator)))
            loss_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
            correct += strategy.reduce(tf.distribute.ReduceOp.SUM, right, axis=None)
        return loss_sum, correct

    return train_chunk


def _write_scalars(writer: tf.summary.SummaryWriter, step: int, **values: float) -> None:
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.scalar(name, value)


def _throughput(chunk_times: list[tuple[int, float]]) -> float | None:
    """Training examples per second, leaving out the first call (it includes tracing) when possible."""
    timed = chunk_times[1:] or chunk_times
    seconds = sum(t for _, t in timed)
    return round(sum(n for n, _ in timed) / seconds, 1) if seconds else None


def _log_run_start(logs: str, train_writer: tf.summary.SummaryWriter, config: Config,
                   train: data_lib.Split) -> None:
    """Hyper-parameters (hparams plugin) for the run, and sample inputs in the train log."""
    with tf.summary.create_file_writer(logs).as_default():
        values = {k: v for k, v in config.flat().items() if k not in ("output_dir", "run", "data_dir")}
        hparams_api.hparams(values, trial_id=config.run.run)
    with train_writer.as_default(step=0):
        tf.summary.image("inputs", train.images[:SAMPLE_IMAGES].astype(np.float32) / 255.0,
                         max_outputs=SAMPLE_IMAGES)


def _writer(logdir: str, chief: bool) -> tf.summary.SummaryWriter:
    """A TensorBoard writer on the chief; a writer that discards everything on other workers."""
    return tf.summary.create_file_writer(logdir) if chief else tf.summary.create_noop_writer()


def _progress(total: int, initial: int, show: bool) -> tqdm:
    """A progress bar with ETA; sparse updates when stderr is a log file, not a terminal."""
    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True, disable=not show,
                miniters=1, mininterval=0.5 if sys.stderr.isatty() else 30.0)
