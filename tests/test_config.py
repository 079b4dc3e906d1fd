import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from trainer.config import Config, rank_batch, steps_per_epoch
from trainer.train.cli import build_parser, config_from_args, main


def test_defaults_are_the_tutorial_recipe():
    cfg = Config()
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.learning_rate) == ("mlp", 5, 128, 0.001)
    assert cfg.num_workers == 2 and not cfg.elastic and cfg.output == "models"
    assert [rank_batch(cfg.batch_size, cfg.num_workers, r) for r in (0, 1)] == [64, 64]


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
    ({"batch_size": 3, "num_workers": (1, 4)}, "smaller than num_workers 4"),
    ({"num_workers": (3, 2)}, "MIN must not exceed MAX"),
    ({"num_workers": (0, 2)}, "num_workers must be at least 1"),
    ({"num_workers": (1, 2, 3)}, "num_workers must be N or MIN-MAX"),
    ({"num_workers": (2, "4")}, "num_workers must be N or MIN-MAX"),
    ({"num_workers": "2-4"}, "num_workers must be a int | tuple"),
    ({"num_workers": (2, 4), "per_worker_batch_size": 64}, "an elastic run keeps one global batch"),
    ({"resize_interval_s": -1.0}, "resize_interval_s must be 0 or more"),
    ({"learning_rate": 0.0}, "learning_rate must be positive"),
    ({"learning_rate": -1e-3}, "learning_rate must be positive"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"epochs": "5"}, "epochs must be a int"),
    ({"use_gpu": 1}, "use_gpu must be a bool"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be at least 1"),
    ({"cpus_per_worker": 0}, "cpus_per_worker must be at least 1"),
    ({"data_path": "disk"}, "unknown data_path 'disk'; choose one of auto, memory, stream"),
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
    (["--batch-size", "2", "--num-workers", "1-3"], "smaller than num_workers 3"),
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


def _commands():
    from trainer.promote import retrain
    from trainer.serve import predict
    from trainer.train import cli

    return {"train": (main, cli.build_parser), "retrain": (retrain.main, retrain.build_parser),
            "predict": (predict.main, predict.build_parser)}


@pytest.mark.parametrize("command", ["train", "retrain", "predict"])
def test_every_command_prints_its_help(command, capsys):
    """argparse formats help strings with %, so a stray '%' in a field's help breaks --help. Each
    command's --help prints its parser's whole help, every flag in it, and exits 0."""
    run, build = _commands()[command]
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    parser = build()
    assert out == parser.format_help()
    options = [o for action in parser._actions for o in action.option_strings if action.help != argparse.SUPPRESS]
    assert len(options) > 2 and all(option in out for option in options), options  # more than -h, --help


# Runs a file of scripts/ as `python scripts/NAME.py --help` would (scripts/ first on sys.path, the
# project from its installation), recording every argparse parser made, which of them script_parser
# made and for which module, and which printed the help; the report goes to a file, stdout is the help.
RUN_WITH_HELP = r"""
import argparse, json, os, runpy, sys
from trainer.common import cli

script, report = sys.argv[1], sys.argv[2]
parsers, printed, inside = [], [], []
real_init, real_print_help, real_script_parser = (argparse.ArgumentParser.__init__,
                                                  argparse.ArgumentParser.print_help, cli.script_parser)

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    parsers.append({"id": id(self), "script_parser": inside[-1] if inside else None})

def print_help(self, file=None):
    printed.append(id(self))
    return real_print_help(self, file)

def script_parser(doc):
    caller = sys._getframe(1).f_globals
    inside.append({"doc": doc, "caller_file": caller.get("__file__"), "caller_doc": caller.get("__doc__")})
    try:
        return real_script_parser(doc)
    finally:
        inside.pop()

argparse.ArgumentParser.__init__, argparse.ArgumentParser.print_help = init, print_help
cli.script_parser = script_parser
sys.path[0] = os.path.dirname(script)
sys.argv = [script, "--help"]
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
with open(report, "w") as f:
    json.dump({"exit": code, "parsers": parsers, "printed": printed}, f)
"""

SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_prints_its_docstring_as_help_from_the_one_parser(script, tmp_path):
    """Each script in scripts/ imports cleanly (no sys.path set-up: the project is installed) and
    starts from common.cli.script_parser: --help shows the docstring as written, defaults not repeated.
    A file that, run so, prints nothing and makes no parser is a module the scripts import
    (cpu_sampler.py), not a command."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-c", RUN_WITH_HELP, str(script), str(report)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and report.exists(), done.stderr[-2000:]
    ran = json.loads(report.read_text())
    assert ran["exit"] in (0, None), done.stderr[-2000:]
    if not ran["parsers"] and not ran["printed"] and not done.stdout:
        return  # a module, not a command
    assert all(p["script_parser"] is not None for p in ran["parsers"]), ran  # no parser of its own
    (helped,) = [p for p in ran["parsers"] if p["id"] in ran["printed"]]
    made = helped["script_parser"]
    assert os.path.samefile(made["caller_file"], script)  # the script's own parser,
    assert made["doc"] == made["caller_doc"] and made["doc"].strip()  # from its own docstring,
    assert made["doc"].strip() in done.stdout  # shown as written (line breaks and indents kept)
    assert "(default: None)" not in done.stdout


def test_the_data_path_is_picked_by_size_unless_forced():
    from trainer.config import STREAM_ABOVE_ROWS

    assert not Config().streams(60_000) and not Config().streams(STREAM_ABOVE_ROWS)
    assert Config().streams(STREAM_ABOVE_ROWS + 1) and Config(data_path="stream").streams(3000)
    assert not Config(data_path="memory").streams(8_100_000)


def test_global_batch_is_fixed_unless_a_per_worker_batch_is_asked_for():
    assert [Config(num_workers=n).batch_size for n in (1, 2, 4)] == [128, 128, 128]
    assert [Config(num_workers=n, per_worker_batch_size=64).batch_size for n in (1, 2, 4)] == [64, 128, 256]
    cfg = Config(num_workers=4, per_worker_batch_size=64)
    assert rank_batch(cfg.batch_size, 4, 3) == 64 and Config.from_dict(cfg.to_dict()) == cfg
    cli = config_from_args(build_parser().parse_args(["--per-worker-batch-size", "512"]))
    assert (cli.batch_size, rank_batch(cli.batch_size, cli.num_workers, 0)) == (1024, 512)


@pytest.mark.parametrize("kwargs, message", [
    ({"per_worker_batch_size": 64, "batch_size": 256}, "batch_size 256 is not 64 x 2 workers"),
    ({"per_worker_batch_size": 0}, "per_worker_batch_size must be at least 1, got 0"),
    ({"per_worker_batch_size": "64"}, "per_worker_batch_size must be a int | None"),
    ({"lr_scaling": "cubic"}, "unknown lr_scaling 'cubic'"),
    ({"warmup_epochs": -1, "lr_scaling": "linear"}, "warmup_epochs must be 0 or more"),
    ({"warmup_epochs": 1}, "give --lr-scaling linear or sqrt too"),
])
def test_batch_and_learning_rate_options_raise_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        Config(**kwargs)
    assert "\n" not in str(info.value)


def test_cli_rejects_a_global_and_a_per_worker_batch_that_disagree(capsys):
    assert main(["--batch-size", "256", "--per-worker-batch-size", "64"]) == 2
    assert capsys.readouterr().err.startswith("error: give batch_size (global) or per_worker_batch_size")


def test_learning_rate_scales_with_the_global_batch():
    from trainer.model.lr_schedule import learning_rate, scaled_rate

    assert learning_rate(Config()) == 0.001  # the tutorial's plain float rate, unchanged
    assert scaled_rate(Config(batch_size=1024, lr_scaling="none")) == pytest.approx(0.001)
    assert scaled_rate(Config(batch_size=1024, lr_scaling="linear")) == pytest.approx(0.008)
    assert scaled_rate(Config(batch_size=512, lr_scaling="sqrt")) == pytest.approx(0.002)
    assert steps_per_epoch(30_000, 1024, 2) == 58


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7])
def test_every_world_size_splits_the_same_global_batch(world):
    """The remainder goes one example each to the first ranks; every rank runs the same steps."""
    batches = [rank_batch(128, world, rank) for rank in range(world)]
    assert sum(batches) == 128 and max(batches) - min(batches) <= 1 and batches == sorted(batches, reverse=True)
    shard = 60_000 // world
    assert all(steps_per_epoch(shard, 128, world) * b <= shard for b in batches)


def test_elastic_worker_counts_parse_validate_and_round_trip():
    cfg = config_from_args(build_parser().parse_args(["--num-workers", "2-4", "--resize-interval-s", "5"]))
    assert (cfg.num_workers, cfg.elastic, cfg.min_workers, cfg.max_workers) == ((2, 4), True, 2, 4)
    assert Config.from_dict({**cfg.to_dict(), "num_workers": [2, 4]}) == cfg  # as metrics.json holds it
    assert Config(num_workers=(3, 3)).num_workers == 3  # MIN == MAX is a fixed count
    assert config_from_args(build_parser().parse_args(["--num-workers", "3"])).num_workers == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--num-workers", "two"])


def test_warm_up_ramps_per_step_then_holds_and_survives_checkpoint_and_save(tmp_path):
    """The ramp follows optimizer.iterations (restored by checkpoints), and the saved .keras model
    loads with plain keras.saving.load_model in a process that never imports this project."""
    import subprocess
    import sys

    import numpy as np

    from trainer.model.lr_schedule import learning_rate
    from trainer.model.network import build_model
    from trainer.train import checkpoint

    cfg = Config(batch_size=1024, lr_scaling="linear", warmup_epochs=2)
    rates = [float(learning_rate(cfg, steps_per_epoch=10)(step)) for step in (0, 10, 20, 21, 500)]
    assert rates == pytest.approx([0.001, 0.0045, 0.008, 0.008, 0.008])
    model = build_model(cfg, steps_per_epoch=10)
    x = np.random.default_rng(0).random((64, 784), "float32")
    y = np.eye(10, dtype="float32")[np.arange(64) % 10]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 8 steps: halfway into epoch 1 of the ramp
    assert float(model.optimizer.learning_rate) == pytest.approx(0.001 + 0.007 * 8 / 20)
    checkpoint.save(str(tmp_path / "ckpt"), model, 1, cfg.to_dict(), [])
    resumed = build_model(cfg, steps_per_epoch=10)
    resumed.optimizer.build(resumed.trainable_variables)
    checkpoint.load(str(tmp_path / "ckpt"), resumed)
    assert float(resumed.optimizer.learning_rate) == pytest.approx(float(model.optimizer.learning_rate))
    model.save(tmp_path / "m.keras")
    loaded = subprocess.run(
        [sys.executable, "-c", "import keras, sys; m = keras.saving.load_model(sys.argv[1]); "
         "print(int(m.optimizer.iterations), float(m.optimizer.learning_rate))", str(tmp_path / "m.keras")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    iterations, rate = loaded.stdout.split()
    assert int(iterations) == 8 and float(rate) == pytest.approx(0.001 + 0.007 * 8 / 20)


def test_what_each_setting_shapes_is_marked_once_and_read_by_resume_and_retraining():
    """Resume refuses a changed recipe; retraining's "nothing changed" check ignores where and how a
    run executed. Both lists come from the marks on Config's fields."""
    from trainer.promote.policy import LEARNED_FROM, fingerprint
    from trainer.train.driver import RESUME_KEYS

    assert set(RESUME_KEYS) == {"model", "hidden_units", "dropout", "batch_size", "learning_rate", "lr_scaling",
                                "warmup_epochs", "seed", "augment"}
    assert set(RESUME_KEYS) < set(LEARNED_FROM) and {"epochs", "num_workers"} <= set(LEARNED_FROM)
    base = Config().to_dict()
    for operational in {"tensorboard_dir": "/tmp/tb", "resource_wait_s": 60.0, "export_savedmodel": True,
                        "verbose": True, "output": "elsewhere", "steps_per_call": 50}.items():
        assert fingerprint(dict(base, **dict([operational])), "abc") == fingerprint(base, "abc"), operational
    assert fingerprint(dict(base, epochs=6), "abc") != fingerprint(base, "abc")
    # A version recorded before hidden_units and dropout existed trained the tutorial's 512 units, no dropout.
    older = {k: v for k, v in base.items() if k not in ("hidden_units", "dropout")}
    assert fingerprint(older, "abc") == fingerprint(base, "abc")
    assert fingerprint(older, "abc") != fingerprint(dict(base, hidden_units=256), "abc")


def test_every_field_type_parses_from_the_command_line_and_is_validated():
    from trainer.config import FIELD_TYPES

    for f in dataclasses.fields(Config):
        assert f.type in FIELD_TYPES, f.name
    args = build_parser().parse_args(["--resource-wait-s", "2.5", "--local-cpus", "3", "--verbose"])
    cfg = config_from_args(args)
    assert (cfg.resource_wait_s, cfg.local_cpus, cfg.verbose) == (2.5, 3, True)
    with pytest.raises(ValueError, match=re.escape("local_cpus must be a int | None, got 2.5")):
        Config(local_cpus=2.5)


@pytest.mark.parametrize("cfg, total, message", [
    (Config(num_workers=4), {"CPU": 3}, "asked for 4 workers x 1 CPU; the cluster has 3 CPUs"),
    (Config(num_workers=(2, 8)), {"CPU": 3}, None),  # an elastic run needs only MIN to start
    (Config(num_workers=(4, 8)), {"CPU": 3}, "asked for at least 4 workers x 1 CPU; the cluster has 3 CPUs"),
    (Config(num_workers=(1, 2), use_gpu=True), {"CPU": 8}, "--use-gpu asked for at least 1 workers"),
    (Config(num_workers=2, cpus_per_worker=2), {"CPU": 4}, None),  # every CPU may go to a worker
])
def test_the_cluster_must_hold_the_fixed_count_or_an_elastic_minimum(cfg, total, message):
    from trainer.train.cluster import shortfall

    problem = shortfall(total, cfg)
    assert problem is None if message is None else problem.startswith(message) or message in problem, problem
