"""The reference tutorials' analyses of a trained run, as PNG files and TensorBoard images.

analyze(folder, config) reads a local run folder (per-epoch history, latest checkpoint), rebuilds the
model and writes analysis/*.png, analysis/summary.json and logs/analysis/ images.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import matplotlib

matplotlib.use("Agg")
import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colors  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.config import Config, ConfigError  # noqa: E402
from trainer.datasets import IMAGE_SHAPE, NUM_CLASSES, Split, load_split  # noqa: E402
from trainer.evaluate import EVAL_BATCH, summarize  # noqa: E402
from trainer.export import percent  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.run_dir import ANALYSIS, LOGS, RunFolder, checkpoint_step, to_json  # noqa: E402

# What analyze() writes (and the order of summary.json); the reader's results the run folder publishes.
OUTPUTS = (ANALYSIS, f"{LOGS}/{ANALYSIS}")
FINGERPRINTS_PER_CLASS = 20
OPTIMAL_STEPS = 400
LABELLED_EPOCHS = 5  # curves of at most this many epochs get their values written beside the points


@dataclasses.dataclass
class Inputs:
    """What every analysis reads: the run's config, its restored model, the data and predictions."""

    config: Config
    model: keras.Model
    train: Split
    test: Split
    probabilities: np.ndarray  # [test examples, 10]
    step: int  # the training step of the checkpoint the model was restored from


def load_inputs(folder: RunFolder, config: Config) -> Inputs:
    """Rebuild the run's model (configured by `config`) from its latest checkpoint and predict the test set."""
    latest = tf.train.latest_checkpoint(folder.checkpoints)
    if latest is None:
        raise ConfigError(f"{folder.root} has no checkpoint to analyze")
    model = build_model(config.model.model)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    test = load_split(config.data, "test")
    logits = model.predict(test.images, batch_size=EVAL_BATCH, verbose=0)
    return Inputs(config, model, load_split(config.data, "train"), test, tf.nn.softmax(logits).numpy(),
                  checkpoint_step(os.path.basename(latest)))


def _save(fig: plt.Figure, path: str) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _grid(fig: plt.Figure, spec: Any, images: np.ndarray, titles: list[str], title: str) -> None:
    sub = spec.subgridspec(3, 3, hspace=0.45)
    for i, (image, text) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(sub[i // 3, i % 3])
        ax.imshow(image[..., 0], cmap="gray_r")
        ax.set_title(text, fontsize=10)
        ax.axis("off")
    fig.text(0.27 if "random" in title else 0.73, 0.98, title, ha="center", fontsize=12)


def predictions(inputs: Inputs, path: str, seed: int = 0) -> dict[str, Any]:
    """3x3 random test images and the 3x3 most confidently wrong ones, titled predicted / true."""
    predicted = inputs.probabilities.argmax(axis=1)
    confidence = inputs.probabilities.max(axis=1)
    random_ids = np.random.default_rng(seed).choice(len(inputs.test), 9, replace=False)
    wrong = np.flatnonzero(predicted != inputs.test.labels)
    worst = wrong[np.argsort(-confidence[wrong])][:9]
    fig = plt.figure(figsize=(13, 7.5))
    outer = fig.add_gridspec(1, 2, wspace=0.15)
    for spec, ids, title in ((outer[0], random_ids, "9 random test images"),
                             (outer[1], worst, "most confidently wrong")):
        _grid(fig, spec, inputs.test.images[ids],
              [f"pred {predicted[i]} ({percent(confidence[i])})\ntrue {inputs.test.labels[i]}" for i in ids], title)
    _save(fig, path)
    return {"random": random_ids.tolist(), "most_confidently_wrong": worst.tolist()}


def label_distribution(inputs: Inputs, path: str) -> dict[str, list[float]]:
    """Train vs test class frequencies in percent, as side-by-side bars."""
    shares = {name: (100 * np.bincount(split.labels, minlength=NUM_CLASSES) / len(split)).tolist()
              for name, split in (("train", inputs.train), ("test", inputs.test))}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(NUM_CLASSES)
    for offset, (name, values) in zip((-0.2, 0.2), shares.items()):
        ax.bar(x + offset, values, width=0.4, label=f"{name} ({len(getattr(inputs, name)):,} images)")
    ax.set(xticks=x, xlabel="class", ylabel="share of images (%)",
           title=f"Label distribution, {inputs.config.data.dataset}")
    ax.set_ylim(0, 1.12 * max(max(v) for v in shares.values()))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    _save(fig, path)
    return {name: [round(v, 4) for v in values] for name, values in shares.items()}


def curves(history: list[dict[str, Any]], path: str) -> dict[str, list[float]]:
    """Train and test loss and accuracy per epoch, from the run's recorded history (values written beside the
    points of a short run, whose few points make no curve)."""
    series = {f"{split}_{tag}": [entry[f"{split}_{tag}"] for entry in history]
              for split in ("train", "test") for tag in ("loss", "accuracy")}
    epochs = [entry["epoch"] for entry in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"wspace": 0.3})
    for ax, tag in zip(axes, ("loss", "accuracy")):
        values = [v for split in ("train", "test") for v in series[f"{split}_{tag}"]]
        for split in ("train", "test"):
            points = series[f"{split}_{tag}"]
            ax.plot(epochs, points, marker="o", label=split)
            if len(epochs) <= LABELLED_EPOCHS:
                for epoch, value in zip(epochs, points):
                    text = f"{value:.2%}" if tag == "accuracy" else f"{value:.4f}"
                    ax.annotate(text, (epoch, value), textcoords="offset points", xytext=(8, -3), fontsize=9)
        if values:
            low, high = min(values), max(values)
            margin = max((high - low) * 0.15, 0.005 if tag == "accuracy" else 0.01)
            ax.set_ylim(max(0.0, low - margin), min(1.0, high + margin) if tag == "accuracy" else high + margin)
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if tag == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set(xlabel="epoch", ylabel=tag, title=f"{tag.capitalize()} per epoch")
        if len(epochs) <= LABELLED_EPOCHS:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    _save(fig, path)
    return series


def _text_colour(cmap: Any, norm: Any, value: float) -> str:
    """White on dark cells, black on light ones."""
    red, green, blue, _ = cmap(norm(value))
    return "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black"


def confusion(inputs: Inputs, path: str) -> dict[str, Any]:
    """Heatmap of the test confusion matrix (log colour scale, counts written in), with per-class recall to the
    right and precision below."""
    matrix = tf.math.confusion_matrix(inputs.test.labels, inputs.probabilities.argmax(axis=1),
                                      num_classes=NUM_CLASSES).numpy()
    metrics = summarize(matrix, 0.0)
    fig = plt.figure(figsize=(10, 9.5))
    grid = fig.add_gridspec(2, 3, width_ratios=(10, 1.2, 0.4), height_ratios=(10, 1.2), wspace=0.08, hspace=0.08)
    ax = fig.add_subplot(grid[0, 0])
    blues = plt.get_cmap("Blues")
    counts = colors.SymLogNorm(linthresh=1, linscale=0.5, vmin=0, vmax=max(int(matrix.max()), 10), base=10)
    shown = ax.imshow(matrix, cmap=blues, norm=counts, aspect="auto")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=9,
                color=_text_colour(blues, counts, count))
    ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), ylabel="true label")
    ax.xaxis.set_ticks_position("top")
    fig.suptitle(f"Confusion matrix: accuracy {metrics['test_accuracy']:.2%} on {matrix.sum():,} test images",
                 fontsize=13)
    greens = plt.get_cmap("Greens")
    shares = colors.Normalize(vmin=0.8, vmax=1.0)
    recall = fig.add_subplot(grid[0, 1])
    recall.imshow(np.array(metrics["recall"])[:, None], cmap=greens, norm=shares, aspect="auto")
    for i, value in enumerate(metrics["recall"]):
        recall.text(0, i, f"{value:.1%}", ha="center", va="center", fontsize=9,
                    color=_text_colour(greens, shares, value))
    recall.set(xticks=[], yticks=[])
    recall.set_title("recall", fontsize=10)
    precision = fig.add_subplot(grid[1, 0])
    precision.imshow(np.array(metrics["precision"])[None, :], cmap=greens, norm=shares, aspect="auto")
    for i, value in enumerate(metrics["precision"]):
        precision.text(i, 0, f"{value:.1%}", ha="center", va="center", fontsize=9,
                       color=_text_colour(greens, shares, value))
    precision.set(yticks=[0], yticklabels=["precision"], xticks=range(NUM_CLASSES), xlabel="predicted label")
    bar = fig.colorbar(shown, cax=fig.add_subplot(grid[0, 2]))
    ticks = [t for t in (0, 1, 10, 100, 1000, 10000) if t <= counts.vmax]
    bar.set_ticks(ticks, labels=[f"{t:,}" for t in ticks])
    bar.set_label("test images (log scale)")
    _save(fig, path)
    return {"confusion_matrix": matrix.tolist(), "accuracy": metrics["test_accuracy"],
            "precision": metrics["precision"], "recall": metrics["recall"]}


def _layer_output(model: keras.Model, layer: keras.layers.Layer, images: np.ndarray) -> np.ndarray:
    return keras.Model(model.inputs, layer.output).predict(images, batch_size=EVAL_BATCH, verbose=0)


def feature_maps(inputs: Inputs, path: str, index: int = 0) -> dict[str, Any] | None:
    """The first conv layer's feature maps for one test image, beside the image (conv models only)."""
    convs = [layer for layer in inputs.model.layers if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        return None
    maps = _layer_output(inputs.model, convs[0], inputs.test.images[index : index + 1])[0]
    channels = maps.shape[-1]
    cols = 8
    rows = -(-channels // cols)
    fig = plt.figure(figsize=(2 + cols * 1.3, rows * 1.4))
    grid = fig.add_gridspec(rows, cols + 2)
    ax = fig.add_subplot(grid[:, :2])
    ax.imshow(inputs.test.images[index, :, :, 0], cmap="gray_r")
    ax.set_title(f"test image {index} (label {inputs.test.labels[index]})")
    ax.axis("off")
    # One colour scale for every map, centred on 0: the same colour is the same response in each map.
    limit = float(np.abs(maps).max()) or 1.0
    for c in range(channels):
        ax = fig.add_subplot(grid[c // cols, 2 + c % cols])
        shown = ax.imshow(maps[..., c], cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"map {c}", fontsize=7)
        ax.axis("off")
    fig.colorbar(shown, ax=fig.axes[1:], fraction=0.02, pad=0.01, label="response (0 = white)")
    fig.suptitle(f"Feature maps of {convs[0].name} ({channels} filters; before any bias, normalisation and activation)")
    _save(fig, path)
    return {"layer": convs[0].name, "image": index, "shape": list(maps.shape)}


def hidden_fingerprints(inputs: Inputs, path: str, per_class: int = FINGERPRINTS_PER_CLASS) -> dict[str, Any] | None:
    """Hidden-layer activations of test images grouped by true class (dense models only)."""
    if any(isinstance(layer, keras.layers.Conv2D) for layer in inputs.model.layers):
        return None
    hidden = next(layer for layer in inputs.model.layers if isinstance(layer, keras.layers.Dense))
    ids = np.concatenate([np.flatnonzero(inputs.test.labels == c)[:per_class] for c in range(NUM_CLASSES)])
    activations = _layer_output(inputs.model, hidden, inputs.test.images[ids])  # [images, units]
    fig, ax = plt.subplots(figsize=(12, 6))
    shown = ax.imshow(activations.T, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks([per_class * c + per_class / 2 for c in range(NUM_CLASSES)], [str(c) for c in range(NUM_CLASSES)])
    for c in range(1, NUM_CLASSES):
        ax.axvline(per_class * c - 0.5, color="white", linewidth=0.8)
    ax.set(xlabel=f"test images, {per_class} per true class", ylabel=f"unit of {hidden.name}",
           title=f"Hidden-layer fingerprints: {hidden.name} ({activations.shape[1]} units) by class")
    fig.colorbar(shown, ax=ax, label="activation")
    _save(fig, path)
    np.save(os.path.splitext(path)[0] + ".npy", activations)
    return {"layer": hidden.name, "images": ids.tolist(), "units": int(activations.shape[1])}


def optimal_inputs(inputs: Inputs, path: str, l2: float, steps: int = OPTIMAL_STEPS) -> dict[str, Any]:
    """Per class, the input maximising that class's logit minus l2 * ||x||^2 (pixels in [0, 1]),
    found by gradient ascent on the input, shown under the class-mean test images."""
    body = keras.Model(inputs.model.get_layer("rescale").output, inputs.model.output)  # takes [0, 1] floats
    x = tf.Variable(tf.fill((NUM_CLASSES,) + IMAGE_SHAPE, 0.1))
    optimizer = keras.optimizers.Adam(0.05)
    classes = tf.range(NUM_CLASSES)

    @tf.function
    def step() -> None:
        with tf.GradientTape() as tape:
            logits = body(x, training=False)
            chosen = tf.gather(logits, classes, axis=1, batch_dims=1)
            loss = -tf.reduce_sum(chosen) + l2 * tf.reduce_sum(tf.square(x))
        optimizer.apply_gradients([(tape.gradient(loss, x), x)])
        x.assign(tf.clip_by_value(x, 0.0, 1.0))

    for _ in range(steps):
        step()
    logits = body(x, training=False).numpy()
    probabilities = tf.nn.softmax(logits).numpy()
    optimal = x.numpy()
    means = [inputs.test.images[inputs.test.labels == c].mean(axis=0) / 255.0 for c in range(NUM_CLASSES)]
    fig, axes = plt.subplots(2, NUM_CLASSES, figsize=(16, 4))
    for c in range(NUM_CLASSES):
        axes[0, c].imshow(means[c][..., 0], cmap="gray_r", vmin=0, vmax=1)
        axes[0, c].set_title(f"mean of {c}", fontsize=9)
        axes[1, c].imshow(optimal[c, ..., 0], cmap="gray_r", vmin=0, vmax=1)
        runner_up = int(np.argmax(np.where(np.arange(NUM_CLASSES) == c, -np.inf, logits[c])))  # the best other class
        # Every class's probability is near 1 (summary.json has them); its logit's lead over the runner-up's differs.
        axes[1, c].set_title(f"optimal {c}\n{logits[c, c] - logits[c, runner_up]:+.1f} over {runner_up}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"Class-mean test images (top); optimal inputs (bottom, L2 penalty {l2}), each titled with its "
                 "logit's lead over the runner-up class")
    _save(fig, path)
    return {"l2": l2, "probability_of_own_class": [round(float(probabilities[c, c]), 6) for c in range(NUM_CLASSES)],
            "inputs": optimal}


def confusion_markdown(confusion: dict[str, Any]) -> str:
    """The confusion matrix with recall and precision as a Markdown table: TensorBoard's Text tab shows it at a
    readable size (its image cards shrink a wide plot)."""
    header = "| true \\ predicted | " + " | ".join(str(c) for c in range(NUM_CLASSES)) + " | recall |"
    rows = [header, "|" + "---|" * (NUM_CLASSES + 2)]
    for label, (counts, recall) in enumerate(zip(confusion["confusion_matrix"], confusion["recall"])):
        rows.append(f"| **{label}** | " + " | ".join(str(n) for n in counts) + f" | {recall:.1%} |")
    rows.append("| precision | " + " | ".join(f"{p:.1%}" for p in confusion["precision"]) + " | |")
    return f"Test accuracy **{confusion['accuracy']:.2%}**\n\n" + "\n".join(rows)


def to_tensorboard(logdir: str, pngs: dict[str, str], confusion: dict[str, Any], step: int) -> None:
    """The PNG files as images in the run's TensorBoard (logs/analysis), and the confusion matrix as a table in
    its Text tab, under one `analysis/` group, at the step of the checkpoint analysed; an earlier analysis is
    replaced."""
    shutil.rmtree(logdir, ignore_errors=True)
    with tf.summary.create_file_writer(logdir).as_default(step=step):
        for name, path in pngs.items():
            image = tf.io.decode_png(tf.io.read_file(path), channels=4)
            tf.summary.image(f"{ANALYSIS}/{name}", image[tf.newaxis], max_outputs=1)
        tf.summary.text(f"{ANALYSIS}/confusion_table", confusion_markdown(confusion))


def analyze(folder: RunFolder, config: Config, l2: float = 0.25) -> dict[str, Any]:
    """Write every analysis of a local run folder trained with `config`; return summary.json's contents."""
    inputs = load_inputs(folder, config)
    out = folder.path(ANALYSIS)
    os.makedirs(out, exist_ok=True)
    pngs = {name: os.path.join(out, f"{name}.png") for name in (
        "predictions", "label_distribution", "curves", "confusion_matrix", "feature_maps",
        "hidden_fingerprints", "optimal_inputs")}
    optimal = optimal_inputs(inputs, pngs["optimal_inputs"], l2)
    summary: dict[str, Any] = {
        "model": inputs.config.model.model,
        "predictions": predictions(inputs, pngs["predictions"]),
        "label_distribution_percent": label_distribution(inputs, pngs["label_distribution"]),
        "curves": curves(folder.history(), pngs["curves"]),
        "confusion": confusion(inputs, pngs["confusion_matrix"]),
        "feature_maps": feature_maps(inputs, pngs["feature_maps"]),
        "hidden_fingerprints": hidden_fingerprints(inputs, pngs["hidden_fingerprints"]),
        "optimal_inputs": {k: v for k, v in optimal.items() if k != "inputs"},
    }
    np.save(os.path.join(out, "optimal_inputs.npy"), optimal["inputs"])
    written = {name: path for name, path in pngs.items() if os.path.exists(path)}
    summary["files"] = sorted(os.path.basename(p) for p in written.values())
    with open(os.path.join(out, "summary.json"), "w") as f:
        f.write(to_json(summary))
    to_tensorboard(folder.path(LOGS, ANALYSIS), written, summary["confusion"], inputs.step)
    return summary

