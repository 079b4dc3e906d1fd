"""Warm start (--init-from): the checks before Ray, loading the weights into the distributed model,
and one real job that starts from a trained sample model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import SAMPLE, add_version, read_metrics, run_job
from trainer.config import Config
from trainer.model.network import build_model, evaluate, preprocess
from trainer.store.model_store import Store, StoreError
from trainer.train import warm


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained with plain Keras on the sample (5 epochs), saved as .keras and .h5, with its
    per-epoch losses: the first one is a cold start's."""
    directory = tmp_path_factory.mktemp("warm")
    with np.load(SAMPLE) as npz:
        x, y = preprocess(npz["x_train"], npz["y_train"])
    model = build_model(Config(seed=7))
    history = model.fit(x, y, batch_size=128, epochs=5, verbose=0).history["loss"]
    for suffix in (".keras", ".h5"):
        model.save(directory / f"source{suffix}")
    return directory / "source.keras", model, history


def test_a_start_loads_the_weights_and_slots_into_a_fresh_distributed_model(trained):
    import tensorflow as tf

    path, source, _ = trained
    start = warm.load(Config(init_from=str(path), init_optimizer=True))
    assert start.version is None and start.describe() == {"from": str(path), "version": None, "optimizer": True}
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])  # the workers' code path, one device
    with strategy.scope():
        model = build_model(Config())
        model.optimizer.build(model.trainable_variables)
    warm.apply(model, start.weights, start.slots)
    probe = preprocess(np.load(SAMPLE)["x_test"][:200], np.zeros(200))[0]
    np.testing.assert_allclose(model.predict(probe, verbose=0), source.predict(probe, verbose=0), atol=1e-6)
    slots = warm.optimizer_slots(model)
    assert len(slots) == 4 and all(np.array_equal(a, b) for a, b in zip(slots, warm.optimizer_slots(source)))
    assert int(model.optimizer.iterations.numpy()) == 0  # the job's schedule starts from its first step


def test_without_init_optimizer_the_optimizer_starts_fresh(trained):
    path, _, _ = trained
    assert warm.load(Config(init_from=str(path))).slots is None


def test_an_h5_file_gives_weights_but_no_optimizer_state(trained):
    path, _, _ = trained
    h5 = str(path.with_suffix(".h5"))
    assert len(warm.load(Config(init_from=h5)).weights) == 4
    with pytest.raises(warm.InitError, match="holds no RMSprop state.*use the .keras file"):
        warm.load(Config(init_from=h5, init_optimizer=True))


def test_a_missing_file_or_one_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(warm.InitError, match="no such file"):
        warm.load(Config(init_from=str(tmp_path / "missing.keras")))
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(warm.InitError, match="is not a Keras model") as caught:
        warm.load(Config(init_from=str(junk)))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("saved, job", [({"model": "cnn"}, {}), ({}, {"model": "cnn"})])
def test_a_model_of_another_kind_is_refused_with_both_shapes(tmp_path, saved, job):
    path = str(tmp_path / "other.keras")
    build_model(Config(**saved)).save(path)
    with pytest.raises(warm.InitError, match="this job trains a mnist_") as caught:
        warm.load(Config(init_from=path, **job))
    assert "\n" not in str(caught.value) and "--model" in str(caught.value)


def test_a_model_with_other_layer_sizes_is_refused():
    with pytest.raises(warm.InitError, match="784x256"):
        warm.check_fits([(784, 256), (256,), (256, 10), (10,)], [(784, 512), (512,), (512, 10), (10,)],
                        "wide.keras", "mnist_mlp", "mnist_mlp")


def test_store_versions_resolve_and_a_store_without_current_is_refused(tmp_path, trained):
    _, source, _ = trained
    store = Store(str(tmp_path / "store"))
    store.create()
    with pytest.raises(StoreError, match="has no current version yet"):
        warm.resolve(Config(init_from="store:current", store=store.root))
    vid = add_version(store, model=source)
    assert warm.resolve(Config(init_from="store:current", store=store.root)) == (store.model_path(vid), vid)
    assert warm.resolve(Config(init_from=f"store:{vid}", store=store.root)) == (store.model_path(vid), vid)
    with pytest.raises(StoreError, match="is not a version id"):
        warm.resolve(Config(init_from="store:yesterday", store=store.root))
    with pytest.raises(StoreError, match="is not a model store"):
        warm.resolve(Config(init_from="store:current", store=str(tmp_path / "nothing")))


@pytest.mark.parametrize("values, message", [
    ({"init_from": "store:current"}, "give --store DIR too"),
    ({"init_optimizer": True}, "give --init-from too"),
    ({"init_from": " "}, "must name a model file"),
])
def test_init_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        Config(**values)


def test_the_job_refuses_a_missing_model_in_one_line_before_ray_starts(tmp_path):
    proc = run_job("--data", str(SAMPLE), "--init-from", str(tmp_path / "missing.keras"),
                   "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "runs"), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --init-from {tmp_path / 'missing.keras'}: no such file"]
    assert "run:" not in proc.stdout and not os.path.exists(tmp_path / "out" / "metrics.json")


@pytest.mark.ray
def test_a_warm_start_begins_where_the_trained_model_ended(tmp_path, trained):
    """Two workers start from the plain-Keras model: their first epoch's loss is near that model's
    last (0.22 after 5 epochs) and far below a cold start's first (about 0.9)."""
    path, source, history = trained
    proc = run_job("--data", str(SAMPLE), "--num-workers", "2", "--epochs", "1", "--init-from", str(path),
                   "--init-optimizer", "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"init: weights from {path} with its optimizer state" in proc.stdout
    metrics = read_metrics(tmp_path / "out")
    assert metrics["init"] == {"from": str(path), "version": None, "optimizer": True}
    first_loss = metrics["epochs"][0]["loss"]
    cold_first, warm_last = history[0], history[-1]
    assert first_loss < cold_first / 3 and first_loss < warm_last * 1.3, (first_loss, history)
    with np.load(SAMPLE) as npz:
        _, source_accuracy, _ = evaluate(source, npz["x_test"], npz["y_test"])
    assert metrics["test_accuracy"] > source_accuracy - 0.02
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["init_from"] == str(path)
