"""train_and_evaluate(config) -> metrics: the tf.function loop, checkpoints, TensorBoard, export."""

from __future__ import annotations

import os
import sys
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
from trainer.distribute import describe, make_strategy
from trainer.evaluate import evaluate_distributed
from trainer.export import export_model
from trainer.models import build_model, build_optimizer
from trainer.storage import RunFolder

SAMPLE_IMAGES = 16  # training images shown in TensorBoard


class Interrupted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; re-running resumes it."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"interrupted by SIGTERM at step {step}; checkpoint {checkpoint} saved; safe to retry")
        self.step = step


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) the configured run, evaluate it, export it; return metrics.json contents."""
    started = time.time()
    folder = RunFolder(config.run.output_dir, config.run.run)
    folder.ensure_writable()
    saved = folder.read_json("config.json")
    if saved is not None:
        conflicts = resume_conflicts(config_from_dict(saved), config)
        if conflicts:
            raise ConfigError(f"run {folder.root} was started with other settings ({'; '.join(conflicts)})")

    train = data_lib.load_split(config.data, "train")
    test = data_lib.load_split(config.data, "test")
    global_batch = config.run.batch_size
    per_epoch = data_lib.steps_per_epoch(len(train), global_batch)
    total_steps = per_epoch * config.run.epochs
    finished = folder.read_json("metrics.json")
    if finished is not None and finished.get("steps") == total_steps:
        log(f"run {folder.root} already finished {total_steps} steps; nothing to train")
        return finished

    strategy = strategy or make_strategy(config.runtime)
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ConfigError(f"global --batch-size {global_batch} is not divisible by {replicas} replicas")

    keras.utils.set_random_seed(config.run.seed)
    with strategy.scope():
        model = build_model(config.model.model)
        o = config.optimizer
        optimizer = build_optimizer(o.optimizer, o.learning_rate, o.momentum, o.schedule, total_steps)
        optimizer.build(model.trainable_variables)
    checkpoints = Checkpoints(folder.checkpoints, model, optimizer)
    try:
        start_step = checkpoints.restore()
    except AssertionError as error:
        raise ConfigError(f"checkpoint in {folder.checkpoints} does not fit model {config.model.model}") from error
    if start_step > total_steps:
        raise ConfigError(f"run {folder.root} already trained {start_step} steps, more than "
                          f"{config.run.epochs} epochs ({total_steps} steps)")
    folder.write_json("config.json", config.to_dict())
    if start_step:
        log(f"resuming {folder.root} from step {start_step} of {total_steps}")

    train_writer = tf.summary.create_file_writer(os.path.join(folder.logs, "train"))
    test_writer = tf.summary.create_file_writer(os.path.join(folder.logs, "test"))
    if start_step == 0:
        _log_run_start(folder.logs, train_writer, config, train)

    dataset = strategy.distribute_datasets_from_function(data_lib.train_dataset_fn(
        train, global_batch, config.run.epochs, config.run.seed, start_step, config.data.augment))
    iterator = iter(dataset)
    train_chunk = _make_train_chunk(strategy, model, optimizer, global_batch)

    step, last_eval = start_step, None
    chunk_times: list[tuple[int, float]] = []  # (examples, seconds) per tf.function call
    with StopSignal() as stop, _progress(total_steps, start_step) as bar:
        while step < total_steps:
            epoch_end = (step // per_epoch + 1) * per_epoch
            n = min(config.run.steps_per_loop, epoch_end - step)
            tick = time.perf_counter()
            loss_sum, correct = (float(t) for t in train_chunk(iterator, tf.constant(n)))
            seconds = time.perf_counter() - tick
            previous, step = step, step + n
            chunk_times.append((n * global_batch, seconds))
            mean_loss, accuracy = loss_sum / (n * global_batch), correct / (n * global_batch)
            learning_rate = float(tf.convert_to_tensor(optimizer.learning_rate))
            _write_scalars(train_writer, step, loss=mean_loss, accuracy=accuracy, learning_rate=learning_rate,
                           examples_per_sec=n * global_batch / seconds)
            bar.update(n)
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{accuracy:.4f}", refresh=False)
            epoch = step // per_epoch
            if step == epoch_end:
                last_eval = evaluate_distributed(strategy, model, test, global_batch)
                _write_scalars(test_writer, step, loss=last_eval["test_loss"], accuracy=last_eval["test_accuracy"])
                bar.write(f"epoch {epoch}/{config.run.epochs}: test accuracy {last_eval['test_accuracy']:.4f}"
                          f" loss {last_eval['test_loss']:.4f}")
            every = config.run.checkpoint_every
            if step == epoch_end or step // every > previous // every or stop.requested:
                path = checkpoints.save(step, epoch)
                if stop.requested:
                    train_writer.flush(), test_writer.flush()
                    raise Interrupted(step, path)
    train_writer.close(), test_writer.close()

    final = last_eval or evaluate_distributed(strategy, model, test, global_batch)
    export_model(model, folder.model)
    metrics = {
        **final,
        "steps": total_steps,
        "epochs": config.run.epochs,
        "replicas": replicas,
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
    folder.write_json("metrics.json", metrics)
    return metrics


def _make_train_chunk(strategy: tf.distribute.Strategy, model: keras.Model,
                      optimizer: keras.optimizers.Optimizer, global_batch: int) -> Callable[..., Any]:
    """A tf.function running `steps` synchronous training steps; returns (summed loss, correct)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def replica_step(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = loss_fn(labels, logits)
            # Scale by the global batch: gradients summed over replicas give the batch mean.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1), labels), tf.float32))
        return tf.reduce_sum(per_example), correct

    @tf.function
    def train_chunk(iterator: Any, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss_sum, correct = tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(steps):
            per_replica = strategy.run(replica_step, args=next(iterator))
            loss, right = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            loss_sum += loss
            correct += right
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


def _progress(total: int, initial: int) -> tqdm:
    """A progress bar with ETA; sparse updates when stderr is a log file, not a terminal."""
    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                miniters=1, mininterval=0.5 if sys.stderr.isatty() else 30.0)
