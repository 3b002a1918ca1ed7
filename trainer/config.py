"""Every setting, once: frozen dataclasses whose fields are the trainer's flags (help text included), model
presets, validation, the exit-code table and how a usage error is reported. No TensorFlow here: the launcher
builds and checks trainer flags with this module alone."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import sys
from typing import Any, Mapping, NoReturn

DATASETS = ("mnist", "fashion_mnist")
DATA_SOURCES = ("auto", "tfds", "idx")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
LR_SCALINGS = ("none", "linear", "sqrt")
PRECISIONS = ("float32", "mixed_float16")
DATA_DIR_ENV = "TRAINER_DATA_DIR"  # the default data dir where it is set (the image sets its own: the data is inside)
POLARITIES = ("auto", "light-on-dark", "dark-on-light")  # predict: MNIST digits are light on dark
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")  # predict: what tf.io.decode_image reads

# Exit codes of `python -m trainer` and `python -m trainer.launch`: the one table (docs/reference.md "Exit codes",
# and the manifests' failure policies, agree with it).
EXIT_USAGE = 2  # bad usage, config or input (or the Kubernetes API refused): never retried
EXIT_NO_CLUSTER = 3  # launcher: no kube config, or the API server did not answer in time
EXIT_RUN_FAILED = 4  # launcher `wait`: the run failed
EXIT_WAIT_TIMEOUT = 5  # launcher `wait`: still running when --timeout passed
EXIT_PEER_LOST = 69  # EX_UNAVAILABLE: a peer of a multi-worker group was lost (or never joined): restart the group
EXIT_NO_GPU = 71  # EX_OSERR: TensorFlow cannot use the GPUs the pod was given (driver, CUDA or cuDNN): retried, counted
EXIT_LEASED = 73  # EX_CANTCREAT: another live trainer holds the run's lease: never retried (wait, or another --run)
EXIT_STORE = 74  # EX_IOERR: the store stayed unreachable (results are kept in local scratch), or a local disk is full
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped early with its work saved (SIGTERM, or the run's lease was lost); retry


# Each reference tutorial's published recipe, plus our own stronger model.
PRESETS: dict[str, dict[str, Any]] = {
    # 784-256-256-256-10, ReLU, Glorot, SGD 0.001, batch 64, 70 epochs.
    "mlp3x256": dict(optimizer="sgd", learning_rate=0.001, batch_size=64, epochs=70),
    # Conv32-MaxPool-Dense128-Dense10, Adam, batch 64, 10 epochs (98.7%, 693,962 parameters).
    "cnn": dict(optimizer="adam", learning_rate=0.001, batch_size=64, epochs=10),
    # 784-300-10, ReLU, SGD 0.1, batch 100, 50 epochs (~98%).
    "mlp300": dict(optimizer="sgd", learning_rate=0.1, batch_size=100, epochs=50),
    # Ours: three conv blocks with batch norm, shift augmentation, cosine-decayed Adam (>= 99.5%).
    "convnet_bn": dict(
        optimizer="adam", learning_rate=0.003, schedule="cosine", batch_size=128, epochs=12, augment=True
    ),
    # Ours, for time to accuracy: small LeNet with batch norm, one epoch of warmed-up cosine Adam (~99.1%).
    "lenet_bn": dict(
        optimizer="adam", learning_rate=0.03, schedule="cosine", warmup_epochs=0.2, batch_size=128, epochs=1
    ),
}


class TrainerError(Exception):
    """A failure reported to the user as one line, ending the process with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(TrainerError, ValueError):
    """A user-facing configuration or input error (exit code 2)."""

    exit_code = EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}")


def fail(message: str, code: int = EXIT_USAGE, now: bool = False) -> NoReturn:
    """Print one `error:` line to stderr and exit with `code` (`now`: without the interpreter's teardown)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _setting(default: Any, help: str, shown: str = "") -> Any:
    """A config field with its flag's help text (and, if `shown`, how its help names the default)."""
    return dataclasses.field(default=default, metadata={"help": help, "shown": shown})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images, from where, and how they are fed."""

    dataset: str = _setting("mnist", f"dataset: {', '.join(DATASETS)}")
    data_dir: str = _setting(os.environ.get(DATA_DIR_ENV) or os.path.join("~", "tensorflow_datasets"),
                             "TFDS data and imported IDX files", f"${DATA_DIR_ENV} or ~/tensorflow_datasets")
    data_source: str = _setting(
        "auto", "auto: TFDS if prepared, else IDX files or the packaged copy; tfds; idx")
    augment: bool = _setting(False, "random shifts of up to 2 pixels")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which architecture from the MODELS registry."""

    model: str = _setting("cnn", f"model preset: {', '.join(PRESETS)}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser and learning-rate schedule."""

    optimizer: str = _setting("adam", "sgd or adam")
    learning_rate: float = _setting(0.001, "peak learning rate")
    momentum: float = _setting(0.0, "SGD momentum")
    schedule: str = _setting("constant", "constant, or cosine decay")
    warmup_epochs: float = _setting(0.0, "epochs of linear warm-up from 0, at most --epochs")
    # learning_rate is the preset's rate at the preset's batch size; with "linear" or "sqrt" it is
    # scaled by (batch_size / preset batch) or its square root when --batch-size differs.
    lr_scaling: str = _setting(
        "none", "none, linear or sqrt: scale by --batch-size / preset's")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length of training, batch, seed and where results go."""

    epochs: int = _setting(10, "passes over the training set")
    batch_size: int = _setting(64, "global batch, split evenly over replicas")
    seed: int = _setting(0, "seed of initialisation, shuffling, augmentation")
    output_dir: str = _setting("runs", "where run folders go: a folder or gs://BUCKET/PREFIX")
    run: str = _setting("", "run folder name; reuse it to resume")
    checkpoint_every: int = _setting(500, "steps between checkpoints")
    steps_per_loop: int = _setting(50, "steps per tf.function call")
    scratch_dir: str = _setting("", "local folder the run trains in: <scratch-dir>/<run>",
                                "<tmp>/mnist-trainer-<uid>/<run>-<hash>")
    log_every: float = _setting(30.0, "seconds between progress lines in a log file")
    ship_every: float = _setting(10.0, "seconds between uploads to the output dir")
    # 25 s fits Kubernetes' default 30 s termination grace period.
    grace_seconds: float = _setting(25.0, "after SIGTERM, save, upload and exit within this")
    store_timeout: float = _setting(300.0, "seconds the final upload retries a store that is down")
    lease_seconds: float = _setting(
        60.0, "a run's lease not renewed for this long is free")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Devices: 0 = all GPUs (or the CPU); N > 0 = split the CPU into N logical devices."""

    cpu_replicas: int = _setting(0, "N > 0: N CPU devices; 0: all GPUs, or the CPU")
    # A node whose CUDA stack fails to load (driver, image) leaves TensorFlow on the CPU without a word.
    expect_gpus: int = _setting(
        0, f"exit {EXIT_NO_GPU} if TensorFlow sees fewer GPUs (the launcher sets it)")
    precision: str = _setting("float32", "float32, or mixed_float16 (for GPUs)")
    jit_compile: bool = _setting(False, "XLA-compile the step (for GPUs)")
    peer_timeout: float = _setting(
        30.0, f"seconds of a peer's silence before it is lost (exit {EXIT_PEER_LOST})")
    startup_timeout: float = _setting(
        600.0, f"seconds to wait for every peer at start (exit {EXIT_PEER_LOST})")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; parsed and validated once, then frozen."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    run: RunConfig = RunConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict, as written to config.json."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """All fields in one dict keyed by field (= flag) name."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}


SECTION_CLASSES = {
    "data": DataConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "run": RunConfig,
    "runtime": RuntimeConfig,
}
FIELD_SECTION = {f.name: s for s, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls)}


def flag(name: str) -> str:
    """The command-line flag of a config field: learning_rate -> --learning-rate."""
    return "--" + name.replace("_", "-")


# How `train --help` groups the flags (every field in one group).
FLAG_GROUPS = {
    "data": ("dataset", "data_dir", "data_source", "augment"),
    "model": ("model", "precision", "jit_compile"),
    "training": ("epochs", "batch_size", "optimizer", "learning_rate", "lr_scaling", "momentum", "schedule",
                 "warmup_epochs", "seed", "checkpoint_every", "steps_per_loop", "cpu_replicas"),
    "storage": ("output_dir", "run", "scratch_dir", "ship_every", "store_timeout", "lease_seconds"),
    "cluster": ("expect_gpus", "grace_seconds", "peer_timeout", "startup_timeout"),
    "logging": ("log_every",),
}


def add_flags(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per config field, named after it, with the field's help, in FLAG_GROUPS' groups; unset flags fall
    back to the preset. Returns the groups by name."""
    fields = {f.name: f for section in SECTION_CLASSES.values() for f in dataclasses.fields(section)}
    groups = {name: parser.add_argument_group(name) for name in FLAG_GROUPS}
    for group, names in FLAG_GROUPS.items():
        for field in (fields[name] for name in names):
            help_ = f"{field.metadata['help']} (default: {field.metadata.get('shown') or _preset_hint(field)})"
            if field.type == "bool":
                groups[group].add_argument(flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction,
                                           help=help_)
            else:
                kind = {"int": int, "float": float}.get(str(field.type), str)
                metavar = "DIR" if field.name.endswith("_dir") else {int: "N", float: "X"}.get(kind, "NAME")
                groups[group].add_argument(flag(field.name), dest=field.name, type=kind, metavar=metavar, help=help_)
    return groups


def _preset_hint(field: dataclasses.Field) -> str:
    """How a flag's help names its default: the value, or each preset's where presets set it."""
    default = str(field.default) if field.default != "" else "generated"
    per_model = [f"{m} {p[field.name]}" for m, p in PRESETS.items() if field.name in p]
    if len(per_model) == len(PRESETS):  # the default model's, and the table of presets for the rest
        return f"per preset; {ModelConfig.model} {PRESETS[ModelConfig.model][field.name]}"
    return ", ".join([default] + per_model)


def flag_names() -> set[str]:
    """Every flag add_flags defines, negations of the boolean ones included."""
    names = {flag(name) for name in FIELD_SECTION}
    return names | {"--no-" + flag(f.name)[2:] for s in SECTION_CLASSES.values() for f in dataclasses.fields(s)
                    if f.type == "bool"}


def config_from_args(args: argparse.Namespace | Mapping[str, Any], **overrides: Any) -> Config:
    """The Config of parsed flags (or a mapping of field values), with `overrides` on top; validated."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return build_config({k: v for k, v in given.items() if k in FIELD_SECTION} | overrides)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    return num_examples // global_batch


def check_replicas(batch_size: int, replicas: int) -> None:
    """Raise ConfigError unless the global batch splits evenly over `replicas`."""
    if replicas and batch_size % replicas:
        raise ConfigError(f"global --batch-size {batch_size} is not divisible by {replicas} replicas")

# Fields that change what is learned: a resumed run must agree on all of them.
RESUME_KEYS = (
    "dataset", "augment", "model", "optimizer", "learning_rate", "momentum",
    "schedule", "warmup_epochs", "batch_size", "seed", "precision",
)
# Fields of one attempt, not of the run: where it runs and how this process behaves. A resume takes them from
# its own flags (or their defaults), never from the run's config.json; every other field comes from the run
# unless its flag is given.
ATTEMPT_KEYS = (
    "output_dir", "run", "scratch_dir", "log_every", "ship_every", "grace_seconds", "store_timeout", "data_dir", "data_source",
    "cpu_replicas", "expect_gpus", "jit_compile", "peer_timeout", "startup_timeout", "lease_seconds",
)


def default_run_name(model: str, dataset: str) -> str:
    """A fresh, sortable run name such as convnet-bn-fashion-mnist-20261122-190312; also a valid
    Kubernetes object name (lowercase letters, digits and '-'), so the launcher can name the job after it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return re.sub(r"[^a-z0-9-]+", "-", f"{model}-{dataset}-{stamp}".lower())


def build_config(overrides: dict[str, Any]) -> Config:
    """Defaults <- the model's preset <- explicit overrides; validated and frozen."""
    unknown = set(overrides) - set(FIELD_SECTION)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    model = given.get("model", ModelConfig.model)
    if model not in PRESETS:
        raise ConfigError(f"unknown model {model!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[model], **given}
    values["learning_rate"] = scaled_learning_rate(values, PRESETS[model]["batch_size"])
    if not values.get("run"):
        values["run"] = default_run_name(model, values.get("dataset", DataConfig.dataset))
    return _validated(values)


def _validated(values: dict[str, Any]) -> Config:
    """The Config of flat field values (missing ones take their defaults), validated."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTION_CLASSES}
    for key, value in values.items():
        sections[FIELD_SECTION[key]][key] = value
    config = Config(**{s: SECTION_CLASSES[s](**kw) for s, kw in sections.items()})
    validate(config)
    return config


def scaled_learning_rate(values: dict[str, Any], preset_batch: int) -> float:
    """The learning rate for values' batch size under its lr_scaling rule (the rate is for preset_batch)."""
    rate = values.get("learning_rate", OptimizerConfig.learning_rate)
    rule = values.get("lr_scaling", OptimizerConfig.lr_scaling)
    ratio = values.get("batch_size", preset_batch) / preset_batch
    if rule == "linear":
        return rate * ratio
    if rule == "sqrt":
        return rate * ratio ** 0.5
    return rate


def validate(config: Config) -> None:
    """Raise ConfigError for the first invalid setting."""
    c = config.flat()
    _choice("dataset", c["dataset"], DATASETS)
    _choice("data_source", c["data_source"], DATA_SOURCES)
    _choice("optimizer", c["optimizer"], OPTIMIZERS)
    _choice("schedule", c["schedule"], SCHEDULES)
    _choice("lr_scaling", c["lr_scaling"], LR_SCALINGS)
    _choice("precision", c["precision"], PRECISIONS)
    for key in ("epochs", "batch_size", "checkpoint_every", "steps_per_loop", "log_every", "ship_every", "grace_seconds",
                "store_timeout", "peer_timeout", "startup_timeout", "lease_seconds"):
        if c[key] <= 0:
            raise ConfigError(f"{flag(key)} must be positive, got {c[key]}")
    if c["warmup_epochs"] < 0 or c["warmup_epochs"] > c["epochs"]:
        raise ConfigError(f"--warmup-epochs must be in [0, --epochs], got {c['warmup_epochs']}")
    if c["learning_rate"] <= 0:
        raise ConfigError(f"--learning-rate must be positive, got {c['learning_rate']}")
    if not 0 <= c["momentum"] < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {c['momentum']}")
    if c["cpu_replicas"] < 0:
        raise ConfigError(f"--cpu-replicas must be >= 0, got {c['cpu_replicas']}")
    check_replicas(c["batch_size"], c["cpu_replicas"])
    if c["expect_gpus"] < 0:
        raise ConfigError(f"--expect-gpus must be >= 0, got {c['expect_gpus']}")
    if c["expect_gpus"] and c["cpu_replicas"]:
        raise ConfigError("--expect-gpus and --cpu-replicas exclude each other (GPUs, or logical CPU devices)")
    if not c["run"] or "/" in c["run"] or c["run"] in (".", ".."):
        raise ConfigError(f"--run must be a plain folder name, got {c['run']!r}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")


def config_from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from config.json contents."""
    return Config(**{s: SECTION_CLASSES[s](**data[s]) for s in SECTION_CLASSES if s in data})


def given_flags(args: argparse.Namespace) -> set[str]:
    """The config fields whose flags were given on the command line."""
    return {k for k, v in vars(args).items() if k in FIELD_SECTION and v is not None}


def resumed(saved: Config, requested: Config, given: set[str] | None = None) -> Config:
    """The config of a run resumed from `saved`: this attempt's ATTEMPT_KEYS and the `given` fields (all, if
    None) from `requested`, the rest from `saved`; validated."""
    ours, theirs = saved.flat(), requested.flat()
    take = set(theirs) if given is None else set(ATTEMPT_KEYS) | given
    values = {k: theirs[k] if k in take else ours[k] for k in ours}
    return _validated(values)


def resume_conflicts(saved: Config, wanted: Config) -> list[str]:
    """Settings that differ between a saved run and the one requested."""
    a, b = saved.flat(), wanted.flat()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in RESUME_KEYS if a[k] != b[k]]
