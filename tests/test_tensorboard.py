"""TensorBoard scalars: the writer on its own, and the real job's event files read back.

The job's run is conftest's `extras_run` (one real 2-worker run on the sample with --model cnn
--augment --tensorboard-dir --export-savedmodel), shared with test_export.py and test_augment.py.
"""

import glob
import os

import numpy as np
import pytest

from tests.conftest import read_metrics
from trainer.config import Config
from trainer.train.cli import main
from trainer.train.tensorboard import TAGS, EpochWriter


def read_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file under `directory`, as TensorBoard reads them."""
    import tensorflow as tf

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(str(directory), "**", "events.out.tfevents.*"), recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


def test_writer_logs_each_tag_per_epoch_and_a_resumed_run_appends(tmp_path):
    import keras
    import tensorflow as tf

    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():  # the worker's LR is a MirroredVariable
        optimizer = keras.optimizers.RMSprop(learning_rate=0.0025)
    first = EpochWriter(str(tmp_path))
    for epoch in (1, 2):
        first.write({"epoch": epoch, "loss": 1.0 / epoch, "accuracy": 0.5 + epoch / 10,
                     "learning_rate": 0.001 * epoch, "samples_per_second": 100.0 * epoch, "seconds": 3.0},
                    optimizer)
    first.close()
    resumed = EpochWriter(str(tmp_path))  # a resumed run: a second event file, same directory
    resumed.write({"epoch": 3, "loss": 0.25, "accuracy": 0.9, "samples_per_second": 300.0}, optimizer)
    resumed.close()

    scalars = read_scalars(tmp_path)
    assert sorted(scalars) == sorted(TAGS)  # "seconds" and other keys are not logged
    assert scalars["loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 0.25})
    assert scalars["accuracy"] == pytest.approx({1: 0.6, 2: 0.7, 3: 0.9})
    assert scalars["samples_per_second"] == pytest.approx({1: 100.0, 2: 200.0, 3: 300.0})
    # The record's rate when it has one, else the optimizer's current rate.
    assert scalars["learning_rate"] == pytest.approx({1: 0.001, 2: 0.002, 3: 0.0025})
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2


def test_a_directory_tensorflow_cannot_write_is_a_one_line_error(capsys):
    with pytest.raises(ValueError, match="s3://"):
        Config(tensorboard_dir="s3://bucket/logs")
    assert main(["--tensorboard-dir", "s3://bucket/logs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tensorboard_dir 's3://bucket/logs'") and "\n" not in err
    with pytest.raises(ValueError, match="empty"):
        Config(tensorboard_dir=" ")


def test_a_relative_directory_is_made_absolute_before_it_reaches_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ray Train workers run in the run's own folder, not the driver's
    cfg = Config(tensorboard_dir="tb")
    assert cfg.tensorboard_dir == str(tmp_path / "tb")
    assert Config.from_dict(cfg.to_dict()) == cfg  # unchanged on the worker side
    assert Config(tensorboard_dir="gs://bucket/logs").tensorboard_dir == "gs://bucket/logs"


def test_writer_reports_a_path_it_cannot_create(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot write event files"):
        EpochWriter(str(blocker / "logs"))


def test_the_job_logs_every_epoch_from_rank_0_only(extras_run):
    output, board, _ = extras_run
    epochs = read_metrics(output)["epochs"]
    scalars = read_scalars(board)
    assert len(glob.glob(str(board / "**" / "events.out.tfevents.*"), recursive=True)) == 1  # rank 0 only
    assert sorted(scalars) == sorted(TAGS)
    for tag in ("loss", "accuracy", "samples_per_second"):
        assert scalars[tag] == pytest.approx({e["epoch"]: e[tag] for e in epochs}, rel=1e-6), tag
    expected_rate = {e["epoch"]: e.get("learning_rate", Config().learning_rate) for e in epochs}
    assert scalars["learning_rate"] == pytest.approx(expected_rate, rel=1e-6)
    assert np.all(np.isfinite(list(scalars["loss"].values())))
