"""End to end on real MNIST: train with two replicas, TensorBoard, export, finished and refused resumes."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from google.protobuf import json_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from conftest import cnn_config, error_lines, run_cli
from trainer.config import ConfigError
from trainer.distribute import make_strategy
from trainer.evaluate import evaluate_serving
from trainer.export import load_serving
from trainer.run_dir import open_for_training
from trainer.train import train_and_evaluate


def test_cnn_on_two_replicas_reaches_the_tutorials_first_epoch_accuracy(cnn_run):
    _, folder, metrics = cnn_run
    assert metrics["test_accuracy"] >= 0.975
    assert metrics["replicas"] == 2 and metrics["strategy"] == "MirroredStrategy"
    assert metrics["steps"] == 60000 // 64 and metrics["epochs"] == 1
    assert metrics["parameters"] == 693_962
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 10000
    assert confusion.sum(axis=1).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.trace(confusion) / 10000 == pytest.approx(metrics["test_accuracy"])
    assert len(metrics["precision"]) == len(metrics["recall"]) == 10
    assert metrics["examples_per_sec"] > 0 and metrics["wall_seconds"] > 0
    assert folder.read_json("metrics.json") == metrics
    [epoch] = metrics["history"]  # one entry per epoch, recorded as it ended
    assert (epoch["epoch"], epoch["step"]) == (1, metrics["steps"])
    assert epoch["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert 0.9 < epoch["train_accuracy"] < 1 and 0 < epoch["train_loss"] < 0.5
    assert folder.read_json("history.json") == {"history": metrics["history"]}
    for name in ("config.json", "checkpoints/checkpoint", "model/saved_model.pb"):
        assert os.path.exists(folder.path(name)), name


def _hparams(logdir: str) -> dict:
    """The hparams of the HParams session in `logdir`, or {} if there is none."""
    events = EventAccumulator(logdir)
    events.Reload()
    content = events.PluginTagToContent("hparams").get(hparams_metadata.SESSION_START_INFO_TAG)
    if content is None:
        return {}
    info = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {k: json_format.MessageToDict(v) for k, v in info.hparams.items()}


def test_tensorboard_has_two_runs_per_training_and_hparams_on_its_test_run(cnn_run):
    _, folder, _ = cnn_run
    tags = {}
    for sub in ("train", "test"):
        events = EventAccumulator(os.path.join(folder.logs, sub))
        events.Reload()
        tags[sub] = set(events.Tags()["tensors"])
    assert {"loss", "accuracy", "learning_rate", "examples_per_sec", "inputs"} <= tags["train"]
    assert {"loss", "accuracy", "accuracy_percent"} <= tags["test"]
    assert {"train", "test"} <= set(os.listdir(folder.logs)) <= {"train", "test", "analysis"}  # no hparams-only run
    # Only what changes the learning, whole numbers as text (not "64.000"); the session's metrics are the test
    # run's accuracy in percent and loss, and the table opens on model, dataset, batch and learning rate.
    assert _hparams(folder.path("logs", "test")) == {
        "model": "cnn", "dataset": "mnist", "optimizer": "adam", "learning_rate": 0.001, "schedule": "constant",
        "batch_size": "64", "epochs": "1", "augment": False, "precision": "float32", "replicas": "2"}
    events = EventAccumulator(folder.path("logs", "test"))
    events.Reload()
    experiment = hparams_metadata.parse_experiment_plugin_data(
        events.PluginTagToContent("hparams")[hparams_metadata.EXPERIMENT_TAG])
    ticked = {h.name for h in experiment.hparam_infos if h.differs}  # listed first, and ticked, by the dashboard
    assert ticked == {"model", "dataset", "batch_size", "learning_rate", "epochs"}
    assert [(m.name.tag, m.display_name) for m in experiment.metric_infos] == [
        ("accuracy_percent", "test accuracy (%)"), ("loss", "test loss")]


def test_a_resume_to_more_epochs_updates_the_hparams(tmp_path, data_dir):
    run = ["--output-dir", str(tmp_path), "--run", "r", "--data-dir", data_dir]
    assert run_cli("train", "--model", "mlp300", "--epochs", "1", *run).returncode == 0
    assert _hparams(str(tmp_path / "r" / "logs" / "test"))["epochs"] == "1"
    assert run_cli("train", "--epochs", "2", *run).returncode == 0
    assert _hparams(str(tmp_path / "r" / "logs" / "test"))["epochs"] == "2"
    assert len(glob.glob(str(tmp_path / "r" / "logs" / "test" / "*.hparams"))) == 1


def test_exported_model_reproduces_the_accuracy_from_uint8_images(cnn_run, mnist):
    _, folder, metrics = cnn_run
    serve = load_serving(folder.model)
    spec = serve.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28, 1]
    out = serve(images=tf.constant(mnist["test"].images[:5]))
    assert out["probabilities"].dtype == tf.float32 and out["probabilities"].shape == (5, 10)
    assert out["classes"].dtype == tf.int64 and out["classes"].shape == (5,)
    served = evaluate_serving(serve, mnist["test"])
    assert served["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-4)
    assert served["confusion_matrix"] == metrics["confusion_matrix"]


def test_evaluate_and_predict_commands(cnn_run, mnist, tmp_path):
    config, folder, metrics = cnn_run
    result = run_cli("evaluate", "--output-dir", config.run.output_dir, "--run", config.run.run)
    assert result.returncode == 0, result.stderr
    assert f'"test_accuracy": {metrics["test_accuracy"]}' in result.stdout
    paths = []
    for i in range(4):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(mnist["test"].images[i, :, :, 0]).save(path)
        paths.append(str(path))
    result = run_cli("predict", "--output-dir", config.run.output_dir, "--run", config.run.run, *paths)
    assert result.returncode == 0, result.stderr
    predicted = [int(line.split("\t")[1]) for line in result.stdout.splitlines()]
    assert predicted == mnist["test"].labels[:4].tolist()  # 7 2 1 0, the first test digits


def test_a_finished_run_is_not_trained_again(cnn_run):
    config, folder, metrics = cnn_run
    before = sorted(glob.glob(folder.path("checkpoints", "*")))
    assert train_and_evaluate(open_for_training(config), make_strategy(config.runtime)) == metrics
    assert sorted(glob.glob(folder.path("checkpoints", "*"))) == before


def test_resuming_with_another_model_is_refused_and_changes_nothing(cnn_run):
    config, folder, _ = cnn_run
    snapshot = {p: open(p, "rb").read() for p in glob.glob(folder.path("**"), recursive=True) if os.path.isfile(p)}
    other = cnn_config(config.run.output_dir, config.data.data_dir, model="mlp300", batch_size=64)
    with pytest.raises(ConfigError, match="model: 'cnn' -> 'mlp300'"):
        open_for_training(other)
    result = run_cli("train", "--model", "mlp300", "--epochs", "1", "--output-dir", config.run.output_dir,
                     "--run", config.run.run, "--data-dir", config.data.data_dir)
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1
    after = {p: open(p, "rb").read() for p in glob.glob(folder.path("**"), recursive=True) if os.path.isfile(p)}
    assert after == snapshot


def test_predict_takes_folders_and_globs_detects_polarity_and_reports_each_bad_file(cnn_run, mnist, tmp_path):
    config, _, _ = cnn_run
    digits, labels = mnist["test"].images[:10, :, :, 0], mnist["test"].labels[:10].tolist()
    (tmp_path / "mnist").mkdir()
    (tmp_path / "paper").mkdir()
    for i, digit in enumerate(digits):
        Image.fromarray(digit).save(tmp_path / "mnist" / f"{i}.png")  # light digit on dark, as MNIST
        # Dark ink on white paper, in colour and three times the size.
        paper = Image.fromarray(255 - digit).resize((84, 84), Image.NEAREST).convert("RGB")
        paper.save(tmp_path / "paper" / f"{i}.png")
    (tmp_path / "notes.png").write_text("not an image")
    result = run_cli("predict", "--output-dir", config.run.output_dir, "--run", config.run.run,
                     str(tmp_path / "mnist"), str(tmp_path / "paper" / "*.png"), str(tmp_path / "notes.png"),
                     str(tmp_path / "missing.png"))
    assert result.returncode == 2
    assert sorted(error_lines(result.stderr)) == [
        f"error: {tmp_path / 'missing.png'}: no such image",
        f"error: {tmp_path / 'notes.png'}: not an image TensorFlow can read (.png, .jpg, .jpeg, .gif, .bmp)"]
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    plain = {int(os.path.basename(r[0])[:-4]): r for r in rows if "/mnist/" in r[0]}
    paper = {int(os.path.basename(r[0])[:-4]): r for r in rows if "/paper/" in r[0]}
    assert sorted(plain) == sorted(paper) == list(range(10))
    assert sum(int(plain[i][1]) == labels[i] for i in range(10)) >= 9
    assert all(plain[i][3] == "none" for i in range(10))  # nothing converted
    assert sum(int(paper[i][1]) == labels[i] for i in range(10)) >= 9  # without the inversion: 2 of 5 wrong
    assert all(paper[i][3] == "colour -> grey, inverted (dark digit on light background), resized 84x84 -> 28x28"
               for i in range(10))


def test_the_evaluation_warmed_up_while_training_is_the_one_called_and_evaluates_alike(tmp_path, data_dir, mnist):
    from trainer import loop
    from trainer.evaluate import Evaluator
    from trainer.learner import Learner

    config = cnn_config(str(tmp_path / "runs"), data_dir, model="mlp300", schedule="cosine", warmup_epochs=0.1)
    strategy = make_strategy(config.runtime)
    schedule = loop.Schedule.of(config.run, len(mnist["train"]))
    learner = Learner(config, strategy, mnist["train"], mnist["test"], schedule, str(tmp_path / "checkpoints"))
    learner.begin(0)
    learner.train_steps(50)  # the train step is traced: the evaluation's warm-up starts beside the next steps
    rate_after_50 = learner.learning_rate
    with pytest.raises(ValueError, match="the next chunk has 50 steps, not 20"):
        learner.train_steps(20)  # the input holds the schedule's chunks, in order
    learner.train_steps(50)
    # The rate the steps returned is the schedule's at the step the optimizer has reached.
    assert learner.learning_rate == float(learner.optimizer.learning_rate) != rate_after_50
    learner.evaluate._warmer.join()
    assert learner.evaluate._evaluate_all.experimental_get_tracing_count() == 1  # traced before any call
    background = learner.evaluate()
    assert learner.evaluate._evaluate_all.experimental_get_tracing_count() == 1  # the call used that trace
    foreground = Evaluator(strategy, learner.model, mnist["test"])()
    assert background == foreground and background["test_examples"] == 10000


def test_the_evaluation_takes_every_example_once_on_two_replicas(tmp_path, data_dir, mnist):
    """1,001 examples on two replicas: two global batches of 1,000, the second leaving one example to the first
    replica and none to the other; the confusion matrix and loss are the model's on every example, once."""
    import keras

    from trainer.datasets import Split
    from trainer.evaluate import Evaluator
    from trainer.models import build_model

    config = cnn_config(str(tmp_path / "runs"), data_dir, model="lenet_bn")
    strategy = make_strategy(config.runtime)
    assert strategy.num_replicas_in_sync == 2
    test = mnist["test"]
    split = Split(images=test.images[:1001], labels=test.labels[:1001], source=test.source)
    with strategy.scope():
        model = build_model("lenet_bn")
    result = Evaluator(strategy, model, split)()
    logits = model(split.images, training=False).numpy()
    expected = np.zeros((10, 10), np.int64)
    np.add.at(expected, (split.labels, logits.argmax(axis=1)), 1)
    loss = keras.losses.sparse_categorical_crossentropy(split.labels, logits, from_logits=True).numpy().sum()
    assert result["test_examples"] == 1001
    np.testing.assert_array_equal(result["confusion_matrix"], expected)
    assert result["test_loss"] == pytest.approx(loss / 1001, rel=1e-4)


def test_a_short_convnet_bn_run_infers_with_settled_batch_norm_statistics(tmp_path, data_dir, mnist):
    """A few hundred steps are enough for the moving statistics to hold what the batches had: the test set,
    evaluated with them, scores about as the last batches did in training (at Keras's momentum 0.99 the moving
    variance of the first maps still held mostly its starting value: 43.9% after a whole epoch)."""
    from trainer import loop
    from trainer.datasets import Split
    from trainer.learner import Learner

    config = cnn_config(str(tmp_path / "runs"), data_dir, model="convnet_bn", batch_size=64,
                        augment=False)
    train = mnist["train"]
    split = Split(train.images[:150 * 64], train.labels[:150 * 64], train.source)
    schedule = loop.Schedule.of(config.run, len(split))
    learner = Learner(config, make_strategy(config.runtime), split, mnist["test"], schedule,
                      str(tmp_path / "checkpoints"))
    learner.begin(0)
    chunks = [stop - start for start, stop in schedule.chunks(0)]
    results = [learner.train_steps(steps) for steps in chunks]
    training_accuracy = results[-1][1] / (chunks[-1] * 64)  # the last chunk's
    test_accuracy = learner.evaluate()["test_accuracy"]
    assert training_accuracy > 0.9 and test_accuracy > training_accuracy - 0.05, (training_accuracy, test_accuracy)


def test_an_opaque_alpha_channel_is_no_conversion_and_a_probability_never_rounds_up_to_certainty(tmp_path, mnist):
    from trainer.export import percent, read_image

    digit = mnist["test"].images[0, :, :, 0]
    for alpha, noted in ((255, False), (128, True)):
        path = tmp_path / f"alpha{alpha}.png"
        Image.fromarray(np.dstack([digit] * 3 + [np.full_like(digit, alpha)]), "RGBA").save(path)
        pixels, notes = read_image(str(path))
        assert ("transparency on white" in notes) == noted and "colour -> grey" in notes, notes
        if not noted:
            np.testing.assert_array_equal(pixels[..., 0], digit)
    assert [percent(p) for p in (0.5, 0.99989, 0.99995, 1.0)] == ["50.00%", "99.99%", "> 99.99%", "> 99.99%"]
