"""--augment: random rotation, shift and zoom while training; off at evaluation and in saved models."""

import numpy as np
import pytest

from tests.conftest import SAMPLE, read_metrics
from trainer.config import Config
from trainer.model.network import augmentation, build_model, preprocess


@pytest.fixture(scope="module")
def digits():
    with np.load(SAMPLE) as npz:
        return tuple(map(np.asarray, preprocess(npz["x_test"][:64], npz["y_test"][:64])))


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_augmentation_is_random_in_training_and_off_in_inference(digits, model_name):
    x, _ = digits
    model = build_model(Config(model=model_name, augment=True))
    first, second = model(x, training=True), model(x, training=True)
    assert not np.allclose(first, second)
    inference = model(x, training=False)
    np.testing.assert_array_equal(inference, model(x, training=False))
    np.testing.assert_allclose(model.predict(x, verbose=0), inference, atol=1e-6)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_augmentation_adds_no_weights(model_name):
    """Same weights as without --augment: the layers hold only RNG state, which checkpoints skip."""
    plain, augmented = (build_model(Config(model=model_name, augment=a)) for a in (False, True))
    assert [w.shape for w in augmented.weights] == [w.shape for w in plain.weights]


def test_augmented_digits_stay_digits(digits):
    """Small moves of the ink, not crops: each digit keeps most of its ink, its centre stays near."""
    import keras

    keras.utils.set_random_seed(0)
    x, _ = digits
    images = x.reshape(-1, 28, 28, 1)
    moved = keras.Sequential(augmentation())(images, training=True).numpy()
    assert moved.shape == images.shape and moved.min() >= -1e-6 and moved.max() <= 1 + 1e-6
    assert not np.allclose(moved, images)
    mass = images.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(moved.sum(axis=(1, 2, 3)), mass, rtol=0.35)  # zoom +-10%: area +-21%
    rows = np.arange(28).reshape(1, 28, 1, 1)
    centre = (images * rows).sum(axis=(1, 2, 3)) / mass
    moved_centre = (moved * rows).sum(axis=(1, 2, 3)) / moved.sum(axis=(1, 2, 3))
    assert np.abs(moved_centre - centre).max() < 4  # shift <= 2.8 px, plus rotation/zoom about the middle


def test_the_job_trains_with_augmentation_and_saves_a_deterministic_model(extras_run, digits):
    import keras

    output, _, log = extras_run
    metrics = read_metrics(output)
    assert metrics["config"]["augment"] is True and metrics["config"]["model"] == "cnn"
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["test_accuracy"] > 0.6  # 2 convnet epochs on 3,000 augmented digits: about 0.82
    x, _ = digits
    for name in ("mnist.keras", "mnist.h5"):  # built-in layers: loads in safe mode, no project code
        model = keras.saving.load_model(output / name, safe_mode=True)
        assert any(layer.name == "augment_rotation" for layer in model.layers)
        np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
