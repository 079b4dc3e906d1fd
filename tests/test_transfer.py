"""`python -m trainer.train.transfer`: an MNIST model adapted to UCI's writers, in-process, as a user runs it."""

import json

import keras
import numpy as np
import pytest

from tests.conftest import SAMPLE
from trainer.config import Config
from trainer.model.network import build_model, preprocess
from trainer.track.models import load_model
from trainer.train.transfer import (
    LABELLED_POOL,
    MODEL_FILE,
    accuracy,
    check_labels,
    format_table,
    main,
    measure,
    split,
    uci_digits,
)

# Measured with the fixture's recipe, model seeds 0-2 x split seeds 0-4, 50 per class, 20 epochs:
# before 0.53-0.71, after head 0.92-0.94 and all 0.94-0.95; the smallest gain was 0.22.
MARGIN = 0.15


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A small real MNIST model (2 epochs on the committed sample), saved as .keras."""
    with np.load(SAMPLE) as npz:
        x, y = preprocess(npz["x_train"], npz["y_train"])
    model = build_model(Config())
    model.fit(x, y, batch_size=128, epochs=2, verbose=0)
    path = tmp_path_factory.mktemp("transfer") / "mnist.keras"
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return uci_digits()


def one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("mode", ["head", "all"])
def test_adapting_improves_held_out_accuracy_and_writes_loadable_outputs(model_path, mode, tmp_path, capsys):
    output = tmp_path / "out"
    assert main([model_path, "--output", str(output), "--mode", mode, "--per-class", "50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["accuracy_after"] > metrics["accuracy_before"] + MARGIN, metrics
    assert (metrics["mode"], metrics["per_class"], metrics["labelled"]) == (mode, 50, 500)
    assert metrics["held_out"] == 1797 - 10 * LABELLED_POOL and "no writer ids" in metrics["split"]
    assert lines[1].startswith(f"held-out accuracy before: {metrics['accuracy_before']:.4f}")
    assert lines[2].startswith(f"held-out accuracy after:  {metrics['accuracy_after']:.4f}")
    assert len(lines) == 4 and str(output / MODEL_FILE) in lines[3]
    evaluation = json.loads((output / "evaluation.json").read_text())
    assert evaluation["accuracy"] == metrics["accuracy_after"]
    assert evaluation["examples"] == metrics["held_out"]
    adapted = keras.saving.load_model(output / MODEL_FILE)
    assert adapted.input_shape == (None, 784) and adapted.output_shape == (None, 10)
    assert [layer.trainable for layer in adapted.layers] == ([False, True] if mode == "head" else [True, True])
    assert not list(output.glob(".*")), "a temporary file was left behind"


def test_from_scratch_is_the_baseline_on_the_same_split(model_path, tmp_path):
    output = tmp_path / "scratch"
    assert main([model_path, "--output", str(output), "--from-scratch", "--per-class", "10", "--epochs", "5"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["mode"] == "from-scratch" and metrics["labelled"] == 100
    assert metrics["accuracy_after"] > 0.6  # 100 digits, 5 epochs: 0.79-0.85 over split seeds 0-4


def test_uci_digits_are_prepared_like_mnist(digits):
    x, y = digits
    assert x.shape == (1797, 784) and x.dtype == np.float32 and y.shape == (1797,)
    assert x.min() == 0 and np.allclose(x.max(axis=1), 1.0)  # each digit's strongest ink is full white
    assert np.array_equal(np.bincount(y), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])


def test_the_split_is_disjoint_stratified_and_its_held_out_set_does_not_depend_on_n(digits):
    labels = digits[1]
    counts = np.bincount(labels, minlength=10)
    _, heldout = split(labels, 1, seed=0)
    previous = np.array([], dtype=np.int64)
    for n in (1, 10, 50, LABELLED_POOL):
        labelled, heldout_n = split(labels, n, seed=0)
        assert np.array_equal(heldout_n, heldout)
        assert not np.intersect1d(labelled, heldout).size
        assert np.array_equal(np.bincount(labels[labelled], minlength=10), np.full(10, n))
        assert np.isin(previous, labelled).all()  # a smaller N's digits are among a larger one's
        previous = labelled
    assert np.array_equal(np.bincount(labels[heldout], minlength=10), counts - LABELLED_POOL)
    assert np.array_equal(split(labels, 50, seed=0)[0], split(labels, 50, seed=0)[0])  # seeded
    assert not np.array_equal(split(labels, 50, seed=1)[1], heldout)


def test_measure_scores_every_way_on_one_split_and_leaves_the_model_as_it_was(model_path, digits):
    x, y = digits
    model = load_model(model_path)
    weights = [w.copy() for w in model.get_weights()]
    [row] = measure(model, x, y, seeds=[0], per_class=(2,), epochs=1)
    assert (row["per_class"], row["seed"], row["epochs"]) == (2, 0, 1)
    _, heldout = split(y, 2, seed=0)
    assert row["before"] == accuracy(model, x[heldout], y[heldout])  # "before" is the model as given
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))  # tuned copies only
    assert len({row[column] for column in ("head", "all", "from-scratch")}) > 1  # three different models


def test_the_table_is_the_mean_over_seeds_with_the_range():
    rows = [{"per_class": n, "seed": seed, "epochs": 20, "before": 0.8, "head": 0.9 + seed / 100,
             "all": 0.95, "from-scratch": 0.7} for seed in (0, 1) for n in (10, 50)]
    lines = format_table(rows).splitlines()
    assert lines[0] == "| per class | before | head | all | from-scratch |"
    assert lines[2] == "| 10 | 0.800 (0.800-0.800) | 0.905 (0.900-0.910) | 0.950 (0.950-0.950) | 0.700 (0.700-0.700) |"
    assert lines[3].startswith("| 50 |") and lines[-1] == "held-out accuracy, seeds 0, 1; 20 epochs"


def test_per_class_out_of_range_is_a_one_line_error(model_path, tmp_path, capsys):
    for n in ("0", str(LABELLED_POOL + 1), "200"):
        assert main([model_path, "--output", str(tmp_path), "--per-class", n]) == 2
        assert f"per-class must be 1..{LABELLED_POOL}" in one_line_error(capsys)
    with pytest.raises(ValueError, match="per-class must be"):
        split(np.arange(10).repeat(150), 101, seed=0)


def test_labels_outside_0_to_9_are_rejected():
    assert check_labels(np.array([0, 9, 3], dtype=np.uint8)).dtype == np.int64
    for bad in ([0, 10], [-1, 3], [0.0, 1.0], [[1, 2]]):
        with pytest.raises(ValueError, match="labels must"):
            check_labels(bad)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        split(np.arange(11).repeat(150), 10, seed=0)


def test_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope.keras"), "--output", str(tmp_path / "out")]) == 2
    assert "not found" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_model_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "fake.keras").write_text("not a zip")
    assert main([str(tmp_path / "fake.keras"), "--output", str(tmp_path / "out")]) == 2
    assert "not a loadable Keras model" in one_line_error(capsys)


def test_a_model_of_another_architecture_is_a_one_line_error(tmp_path, capsys):
    other = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(10, activation="softmax")])
    other.save(tmp_path / "uci.keras")  # a model for the raw 8x8 digits: right classes, wrong input
    assert main([str(tmp_path / "uci.keras"), "--output", str(tmp_path / "out")]) == 2
    assert "expected an MNIST model (None, 784) -> (None, 10)" in one_line_error(capsys)


def test_output_is_required_unless_measuring(model_path, capsys):
    assert main([model_path]) == 2
    assert "--output" in one_line_error(capsys)


def test_bad_settings_fail_before_any_work(model_path, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for args, message in ((["--epochs", "0"], "epochs must be at least 1"),
                          (["--learning-rate", "0"], "learning rate must be positive"),
                          (["--output", str(tmp_path / "file")], "is a file, not a folder")):
        assert main([model_path, "--output", str(tmp_path / "out"), *args]) == 2
        assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
