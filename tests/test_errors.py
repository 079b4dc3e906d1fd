"""One error type for users: a JobError is one line and its exit code; anything else is a bug, said
as such, with its traceback in the log file and not on the console. No Ray."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import trainer
from tests.conftest import SAMPLE
from trainer.common import errors, quiet
from trainer.promote import retrain
from trainer.serve import predict
from trainer.train import cli, driver

# TensorFlow's internals moved in an upgrade: a bug to report. A worker's failure crosses the Ray
# boundary as data, which the driver turns into a TrainingError once Ray Train gives up.
NOT_FOR_USERS = {"TensorFlowInternalsError", "WorkerFailure"}


def boom(*args, **kwargs):
    raise ValueError("boom: a bug deep in a non-input path")


def assert_reported_as_a_bug(code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: a bug, not your input: ValueError: boom"), lines[0]
    log = lines[0].split("the traceback is in ")[1].split(";")[0]
    with open(log) as f:
        assert "Traceback (most recent call last)" in f.read()
    assert "Traceback" not in err


def test_a_plain_value_error_in_training_is_a_bug_not_a_user_error(monkeypatch, capsys):
    monkeypatch.setattr(driver, "run", boom)
    code = cli.main(["--data", str(SAMPLE), "--epochs", "1"])
    assert_reported_as_a_bug(code, capsys.readouterr().err)


def test_a_plain_value_error_in_a_retraining_cycle_is_a_bug(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(retrain, "retrain", boom)
    code = retrain.main(["--store", str(tmp_path / "store"), "--data", str(SAMPLE)])
    assert_reported_as_a_bug(code, capsys.readouterr().err)


def test_a_plain_value_error_in_predict_is_a_bug(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(predict, "load_model", boom)
    code = predict.main([str(tmp_path / "m.keras"), str(tmp_path / "x.png")])
    assert_reported_as_a_bug(code, capsys.readouterr().err)


def test_a_job_error_is_one_line_with_its_exit_code(monkeypatch, capsys):
    def refused(cfg):
        raise errors.ClusterError("the cluster at 127.0.0.1:1 refused the connection")

    monkeypatch.setattr(driver, "run", refused)
    assert cli.main(["--data", str(SAMPLE)]) == 1
    assert capsys.readouterr().err == "error: the cluster at 127.0.0.1:1 refused the connection\n"
    assert cli.main(["--epochs", "0"]) == errors.UsageError.exit_code == 2
    assert capsys.readouterr().err.startswith("error: epochs must be")


def test_the_bug_line_says_where_when_the_log_cannot_be_written(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(driver, "run", boom)
    monkeypatch.setattr(quiet, "log_file", lambda: str(tmp_path / "no-such-dir" / "x.log"))
    assert cli.main(["--data", str(SAMPLE)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: a bug, not your input")


def test_every_error_a_user_can_act_on_is_a_job_error():
    """The project's exception classes: each a JobError (whose kind its base says), but for the few
    that mean a bug or cross the Ray boundary as data."""
    classes = {}
    for info in pkgutil.walk_packages(trainer.__path__, "trainer."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                classes[name] = value
    assert len(classes) >= 15
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, errors.JobError))
    assert outside == sorted(NOT_FOR_USERS), outside
    for name, cls in classes.items():
        if issubclass(cls, errors.JobError) and cls is not errors.JobError:
            assert cls.__mro__[1] is not Exception, f"{name}: a JobError says its kind through its base"
