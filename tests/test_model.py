import keras
import numpy as np
import pytest

from tests.conftest import SAMPLE
from trainer.config import Config
from trainer.model.network import build_model, preprocess


def test_mlp_is_the_tutorial_model():
    model = build_model(Config())
    assert [type(layer).__name__ for layer in model.layers] == ["Dense", "Dense"]
    assert model.layers[0].units == 512 and model.layers[0].activation.__name__ == "relu"
    assert model.layers[1].units == 10 and model.layers[1].activation.__name__ == "softmax"
    assert model.count_params() == 784 * 512 + 512 + 512 * 10 + 10
    assert model.output_shape == (None, 10)


def test_compile_settings():
    model = build_model(Config(learning_rate=0.01))
    assert isinstance(model.optimizer, keras.optimizers.RMSprop)
    assert np.isclose(float(model.optimizer.learning_rate), 0.01)
    assert isinstance(model.loss, keras.losses.CategoricalCrossentropy)
    with np.load(SAMPLE) as npz:
        x, y = preprocess(npz["x_test"][:256], npz["y_test"][:256])
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    probs = model.predict(x, verbose=0)
    assert set(results) == {"loss", "accuracy"}  # the tutorial's metric, under the name metrics.json uses
    assert results["accuracy"] == pytest.approx((probs.argmax(1) == y.argmax(1)).mean(), abs=1e-6)
    assert results["loss"] == pytest.approx(-np.log(probs[np.arange(256), y.argmax(1)]).mean(), rel=1e-4)


def test_cnn_outputs_probabilities():
    model = build_model(Config(model="cnn"))
    probs = model.predict(np.random.default_rng(0).random((4, 784), dtype=np.float32), verbose=0)
    assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_same_seed_gives_same_initial_weights():
    a, b = build_model(Config(seed=3)), build_model(Config(seed=3))
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


def test_preprocess_flattens_scales_and_one_hots():
    with np.load(SAMPLE) as npz:
        images, labels = npz["x_test"][:5], npz["y_test"][:5]
    x, y = map(np.asarray, preprocess(images, labels))
    assert x.shape == (5, 784) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(x * 255, images.reshape(5, 784))  # exact: k/255 * 255 rounds back to k
    assert y.shape == (5, 10) and np.array_equal(y.argmax(1), labels) and np.array_equal(y.sum(1), np.ones(5))


def test_preprocess_is_the_same_on_tensors_in_graph_mode():
    """The workers' step calls it on uint8 tensors inside a tf.function (graph mode, as tf.data's
    map runs it here); the driver calls it on numpy arrays."""
    import tensorflow as tf

    with np.load(SAMPLE) as npz:
        images, labels = npz["x_test"][:64], npz["y_test"][:64]
    batches = tf.data.Dataset.from_tensor_slices((images.reshape(2, 32, 28, 28), labels.reshape(2, 32)))
    mapped = [tuple(map(np.asarray, pair)) for pair in batches.map(preprocess)]
    x, y = map(np.asarray, preprocess(images, labels))
    assert np.array_equal(np.concatenate([m[0] for m in mapped]), x)
    assert np.array_equal(np.concatenate([m[1] for m in mapped]), y)


def test_one_fit_step_lowers_the_loss_on_real_digits():
    with np.load(SAMPLE) as npz:
        x, y = preprocess(npz["x_train"][:512], npz["y_train"][:512])
    model = build_model(Config())
    before = model.evaluate(x, y, verbose=0)[0]
    model.fit(x, y, batch_size=128, epochs=2, verbose=0)
    assert model.evaluate(x, y, verbose=0)[0] < before
