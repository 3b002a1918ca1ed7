"""Frozen run configuration: dataclasses, model presets and validation (no TensorFlow here)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Any

DATASETS = ("mnist", "fashion_mnist")
DATA_SOURCES = ("auto", "tfds", "idx")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
LR_SCALINGS = ("none", "linear", "sqrt")
PRECISIONS = ("float32", "mixed_float16")

# Exit codes (documented in README): 2 = bad usage/config/input, never retried;
# 75 (EX_TEMPFAIL) = stopped by SIGTERM after saving a checkpoint, safe to retry.
# 74 (EX_IOERR) = the store stayed unreachable; results are kept in local scratch.
# 69 (EX_UNAVAILABLE) = a peer of a multi-worker group was lost (or never joined): restart the group.
EXIT_USAGE = 2
EXIT_PEER_LOST = 69
EXIT_STORE = 74
EXIT_INTERRUPTED = 75


class ConfigError(ValueError):
    """A user-facing configuration or input error (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images, from where, and how they are fed."""

    dataset: str = "mnist"
    data_dir: str = os.path.join("~", "tensorflow_datasets")
    data_source: str = "auto"
    augment: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which architecture from the MODELS registry."""

    model: str = "cnn"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser and learning-rate schedule."""

    optimizer: str = "adam"
    learning_rate: float = 0.001
    momentum: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0  # linear warm-up from 0 to learning_rate, then the schedule
    # learning_rate is the preset's rate at the preset's batch size; with "linear" or "sqrt" it is
    # scaled by (batch_size / preset batch) or its square root when --batch-size differs.
    lr_scaling: str = "none"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length of training, batch, seed and where results go."""

    epochs: int = 10
    batch_size: int = 64  # global: split evenly over all replicas
    seed: int = 0
    output_dir: str = "runs"  # a folder or gs://BUCKET/PREFIX
    run: str = ""
    checkpoint_every: int = 500  # steps
    steps_per_loop: int = 50  # steps inside one tf.function call; also the logging interval
    scratch_dir: str = ""  # fast local folder training writes to; "" = the system temp dir
    ship_every: float = 10.0  # seconds between background shipping passes
    grace_seconds: float = 25.0  # after SIGTERM: save, ship, exit within this (fits a 30 s grace period)
    store_timeout: float = 300.0  # seconds the final shipping keeps retrying an unreachable store


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Devices: 0 = all GPUs (or the CPU); N > 0 = split the CPU into N logical devices."""

    cpu_replicas: int = 0
    precision: str = "float32"  # or a Keras mixed-precision policy (float16 gets dynamic loss scaling)
    jit_compile: bool = False  # XLA-compile the forward and backward pass (helps on GPUs, not on CPUs)
    # Multi-worker only: a peer silent for peer_timeout seconds (coordination-service heartbeats) is lost;
    # at start every worker waits up to startup_timeout seconds for all of its peers to join.
    peer_timeout: float = 30.0
    startup_timeout: float = 600.0


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
        optimizer="adam", learning_rate=0.01, schedule="cosine", warmup_epochs=0.1, batch_size=64, epochs=1
    ),
}

# Fields that change what is learned: a resumed run must agree on all of them.
RESUME_KEYS = (
    "dataset", "augment", "model", "optimizer", "learning_rate", "momentum",
    "schedule", "warmup_epochs", "batch_size", "seed", "precision",
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
    for key in ("epochs", "batch_size", "checkpoint_every", "steps_per_loop", "ship_every", "grace_seconds",
                "store_timeout", "peer_timeout", "startup_timeout"):
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
    if c["cpu_replicas"] and c["batch_size"] % c["cpu_replicas"]:
        raise ConfigError(
            f"global --batch-size {c['batch_size']} is not divisible by {c['cpu_replicas']} replicas"
        )
    if not c["run"] or "/" in c["run"] or c["run"] in (".", ".."):
        raise ConfigError(f"--run must be a plain folder name, got {c['run']!r}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")


def config_from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from config.json contents."""
    return Config(**{s: SECTION_CLASSES[s](**data[s]) for s in SECTION_CLASSES if s in data})


def resume_conflicts(saved: Config, wanted: Config) -> list[str]:
    """Settings that differ between a saved run and the one requested."""
    a, b = saved.flat(), wanted.flat()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in RESUME_KEYS if a[k] != b[k]]
