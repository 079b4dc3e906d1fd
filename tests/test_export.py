"""The serving export: a SavedModel that predicts exactly what the Keras model predicts."""

import os

import numpy as np
import pytest

from tests.conftest import SAMPLE, read_metrics
from trainer.config import Config
from trainer.model.export import DIRECTORY, export_savedmodel
from trainer.model.network import build_model, preprocess


@pytest.fixture(scope="module")
def test_pixels():
    with np.load(SAMPLE) as npz:
        return preprocess(npz["x_test"][:200], npz["y_test"][:200])


def serve(path, pixels) -> np.ndarray:
    """Call the exported `serving_default` signature, as TensorFlow Serving would."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    outputs = signature(pixels=tf.constant(pixels))
    assert list(outputs) == ["output_0"]
    return outputs["output_0"].numpy()


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_savedmodel_predicts_like_the_keras_model_even_with_augmentation(tmp_path, test_pixels, model_name):
    model = build_model(Config(model=model_name, augment=True))
    x, _ = test_pixels
    path = export_savedmodel(model, str(tmp_path / DIRECTORY))
    served = serve(path, x)
    # Twice, and equal to Keras' inference: the random layers are off in the served model.
    np.testing.assert_array_equal(served, serve(path, x))
    np.testing.assert_allclose(served, model.predict(x, verbose=0), atol=1e-5)


def test_export_replaces_an_old_one_and_leaves_no_temporary_directories(tmp_path, test_pixels):
    x, _ = test_pixels
    path = tmp_path / DIRECTORY
    export_savedmodel(build_model(Config(seed=1)), str(path))
    newer = build_model(Config(seed=2))
    export_savedmodel(newer, str(path))
    assert os.listdir(tmp_path) == [DIRECTORY]
    np.testing.assert_allclose(serve(path, x), newer.predict(x, verbose=0), atol=1e-5)


def test_a_failed_export_keeps_the_previous_one(tmp_path, test_pixels):
    import keras

    x, _ = test_pixels
    path = tmp_path / DIRECTORY
    old = build_model(Config(seed=1))
    export_savedmodel(old, str(path))
    unbuilt = keras.Sequential([keras.layers.Dense(10)])  # no input shape: nothing to export
    with pytest.raises(ValueError, match="has not yet been built"):
        export_savedmodel(unbuilt, str(path))
    assert os.listdir(tmp_path) == [DIRECTORY]
    np.testing.assert_allclose(serve(path, x), old.predict(x, verbose=0), atol=1e-5)


def test_the_job_exports_a_savedmodel_that_matches_its_keras_model(extras_run, test_pixels):
    import keras

    output, _, _ = extras_run
    assert read_metrics(output)["savedmodel"] == str(output / DIRECTORY)
    x, labels = test_pixels
    keras_probs = keras.saving.load_model(output / "mnist.keras", safe_mode=True).predict(x, verbose=0)
    served = serve(output / DIRECTORY, x)
    np.testing.assert_allclose(served, keras_probs, atol=1e-5)
    np.testing.assert_array_equal(served.argmax(1), keras_probs.argmax(1))
    assert (served.argmax(1) == labels.argmax(1)).mean() > 0.6  # trained (about 0.8), not noise (0.1)
