import dataclasses

import pytest

from trainer.cli import build_parser, config_from_args, main
from trainer.config import Config


def test_defaults_are_the_tutorial_recipe():
    cfg = Config()
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.learning_rate) == ("mlp", 5, 128, 0.001)
    assert cfg.num_workers == 2 and cfg.per_worker_batch == 64 and cfg.output == "models"


def test_config_is_frozen_and_round_trips_as_a_dict():
    cfg = Config(num_workers=4, epochs=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown config keys: epoch"):
        Config.from_dict({"epoch": 3})


@pytest.mark.parametrize("kwargs, message", [
    ({"num_workers": 0}, "num_workers must be at least 1"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"batch_size": 2, "num_workers": 3}, "smaller than num_workers"),
    ({"batch_size": 128, "num_workers": 3}, "not divisible by num_workers 3"),
    ({"learning_rate": 0.0}, "learning_rate must be positive"),
    ({"learning_rate": -1e-3}, "learning_rate must be positive"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"epochs": "5"}, "epochs must be a int"),
    ({"use_gpu": 1}, "use_gpu must be a bool"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be at least 1"),
    ({"cpus_per_worker": 0}, "cpus_per_worker must be at least 1"),
])
def test_invalid_settings_raise_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        Config(**kwargs)
    assert "\n" not in str(info.value)


def test_cli_defaults_come_from_the_config():
    assert config_from_args(build_parser().parse_args([])) == Config()
    cfg = config_from_args(build_parser().parse_args(
        ["--num-workers", "4", "--model", "cnn", "--use-gpu", "--batch-size", "256"]))
    assert (cfg.num_workers, cfg.model, cfg.use_gpu, cfg.batch_size) == (4, "cnn", True, 256)


@pytest.mark.parametrize("argv, message", [
    (["--num-workers", "0"], "num_workers must be at least 1"),
    (["--batch-size", "100", "--num-workers", "3"], "not divisible"),
    (["--learning-rate", "0"], "learning_rate must be positive"),
])
def test_cli_exits_nonzero_with_one_line_before_starting_ray(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_rejects_unknown_model_name():
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--model", "resnet"])
    assert info.value.code == 2
