"""Config building, presets, validation and flag parsing."""

from __future__ import annotations

import dataclasses

import pytest

from trainer import cli
from trainer.config import PRESETS, Config, ConfigError, config_from_args, config_from_dict, resume_conflicts


def parse_train(*argv: str) -> Config:
    return config_from_args(cli.build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("model, optimizer, rate, batch, epochs", [
    ("mlp3x256", "sgd", 0.001, 64, 70),
    ("cnn", "adam", 0.001, 64, 10),
    ("mlp300", "sgd", 0.1, 100, 50),
])
def test_presets_are_the_published_recipes(model, optimizer, rate, batch, epochs):
    config = parse_train("--model", model)
    assert (config.optimizer.optimizer, config.optimizer.learning_rate) == (optimizer, rate)
    assert (config.run.batch_size, config.run.epochs) == (batch, epochs)


def test_flags_override_the_preset_and_map_one_to_one_to_fields():
    config = parse_train("--model", "mlp300", "--epochs", "3", "--batch-size", "50", "--learning-rate", "0.05",
                         "--output-dir", "/tmp/x", "--run", "r1", "--cpu-replicas", "2", "--data-dir", "/d",
                         "--seed", "7", "--dataset", "fashion_mnist", "--augment")
    flat = config.flat()
    assert flat["epochs"] == 3 and flat["batch_size"] == 50 and flat["learning_rate"] == 0.05
    assert flat["optimizer"] == "sgd"  # still from the preset
    assert (flat["output_dir"], flat["run"], flat["cpu_replicas"], flat["data_dir"]) == ("/tmp/x", "r1", 2, "/d")
    assert (flat["seed"], flat["dataset"], flat["augment"]) == (7, "fashion_mnist", True)
    assert set(vars(cli.build_parser().parse_args(["train"]))) - {"command", "verbose"} == set(flat)


def test_default_run_name_is_generated_and_config_round_trips():
    config = parse_train()
    assert config.model.model == "cnn" and config.run.run.startswith("cnn-mnist-")
    assert config_from_dict(config.to_dict()) == config
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet9000"], "unknown model"),
    (["--dataset", "cifar10"], "unknown dataset"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--batch-size", "63", "--cpu-replicas", "2"], "not divisible by 2 replicas"),
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--optimizer", "rmsprop"], "unknown optimizer"),
    (["--run", "a/b"], "--run must be a plain folder name"),
])
def test_invalid_settings_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_train(*argv)


def test_resume_conflicts_name_the_changed_settings():
    a = parse_train("--run", "r")
    b = parse_train("--run", "r", "--model", "mlp300", "--epochs", "99")
    conflicts = resume_conflicts(a, b)
    assert any(c.startswith("model:") for c in conflicts)
    assert not any(c.startswith("epochs:") for c in conflicts)  # training longer is allowed
    assert resume_conflicts(a, parse_train("--run", "r", "--epochs", "20")) == []


def test_every_preset_has_a_model():
    from trainer.models import MODELS

    assert set(PRESETS) == set(MODELS)


def test_every_config_field_is_in_exactly_one_help_group():
    import dataclasses

    from trainer.config import FLAG_GROUPS, SECTION_CLASSES

    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    fields = [f.name for section in SECTION_CLASSES.values() for f in dataclasses.fields(section)]
    assert sorted(grouped) == sorted(fields)
