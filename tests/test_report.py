"""The evaluation report and its plots, from a real model trained on the committed MNIST sample."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SAMPLE
from trainer.config import Config
from trainer.model.network import build_model, preprocess
from trainer.model.report import evaluation_report, format_report, plot_confusion_matrix, write_all


def train_on_sample(epochs: int = 2):
    """The real tutorial model, fitted one epoch at a time so each epoch is timed like the job's."""
    with np.load(SAMPLE) as npz:
        x, y = preprocess(npz["x_train"], npz["y_train"])
        test_images, test_labels = npz["x_test"], npz["y_test"]
    model = build_model(Config())
    history = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        metrics = model.fit(x, y, batch_size=128, epochs=1, verbose=0).history
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "loss": metrics["loss"][0], "accuracy": metrics["accuracy"][0],
                        "seconds": seconds, "samples_per_second": len(x) / seconds})
    probs = model.predict(preprocess(test_images, test_labels)[0], verbose=0)
    return model, history, test_images, test_labels, probs


@pytest.fixture(scope="module")
def trained():
    return train_on_sample()


@pytest.fixture(scope="module")
def written(trained, tmp_path_factory):
    _, history, images, labels, probs = trained
    return write_all(str(tmp_path_factory.mktemp("report")), images, labels, probs,
                     evaluation_report(labels, probs), history)


def assert_real_picture(path: str) -> None:
    """A PNG big enough to read, with something drawn on it (not one flat colour)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 300, image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, f"{path} looks blank (pixel std {pixels.std():.1f})"


def test_write_all_writes_every_file_and_nothing_else(written):
    assert sorted(written) == ["confusion_matrix.png", "evaluation.json", "misclassified.png",
                               "training_curves.png"]
    directory = os.path.dirname(written["evaluation.json"])
    assert sorted(os.listdir(directory)) == sorted(written)  # no temporary files left behind
    for name, path in written.items():
        assert os.path.basename(path) == name and os.path.getsize(path) > 0


@pytest.mark.parametrize("name", ["training_curves.png", "confusion_matrix.png", "misclassified.png"])
def test_each_plot_is_a_real_picture(written, name):
    assert_real_picture(written[name])


def test_evaluation_json_matches_the_predictions(trained, written):
    _, _, _, labels, probs = trained
    report = json.loads(open(written["evaluation.json"]).read())
    assert report["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == labels)))
    assert report["accuracy"] > 0.8  # two epochs on 3,000 digits: about 0.87
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 1000
    assert np.trace(matrix) == round(report["accuracy"] * 1000) == 1000 - report["errors"]
    assert matrix.sum(axis=1).tolist() == np.bincount(labels, minlength=10).tolist()  # rows: true digit
    assert set(report["classes"]) == {str(d) for d in range(10)}
    for scores in [*report["classes"].values(), report["macro_avg"], report["weighted_avg"]]:
        assert set(scores) == {"precision", "recall", "f1", "support"}
        assert all(0 <= scores[k] <= 1 for k in ("precision", "recall", "f1"))
    assert report["macro_avg"]["support"] == 1000
    assert report["classes"]["3"]["support"] == int(np.sum(labels == 3))


def test_format_report_is_a_table_with_every_digit(trained):
    _, _, _, labels, probs = trained
    report = evaluation_report(labels, probs)
    text = format_report(report)
    lines = text.splitlines()
    assert lines[0].split() == ["digit", "precision", "recall", "f1", "support"]
    assert [line.split()[0] for line in lines[1:11]] == [str(d) for d in range(10)]
    assert "macro avg" in text and "weighted avg" in text
    assert f"accuracy  {report['accuracy']:.4f}" in text


def test_a_perfect_model_and_a_single_epoch_still_plot(tmp_path):
    with np.load(SAMPLE) as npz:
        images, labels = npz["x_test"][:200], npz["y_test"][:200]
    history = [{"epoch": 1, "loss": 0.3, "accuracy": 0.91, "seconds": 2.0, "samples_per_second": 30000.0}]
    probs = np.eye(10)[labels]
    paths = write_all(str(tmp_path), images, labels, probs, evaluation_report(labels, probs), history)
    report = json.loads(open(paths["evaluation.json"]).read())
    assert report["accuracy"] == 1.0 and report["errors"] == 0
    assert_real_picture(paths["training_curves.png"])


@pytest.mark.parametrize("labels, probs, message", [
    (np.zeros(3, int), np.zeros((3, 9)), "probs must have shape"),
    (np.zeros(3, float), np.zeros((3, 10)), "1-D integer array"),
    (np.array([0, 1, 10]), np.zeros((3, 10)), "labels must lie in 0..9"),
    (np.zeros(0, int), np.zeros((0, 10)), "no predictions"),
])
def test_bad_predictions_raise_one_line_value_errors(labels, probs, message):
    with pytest.raises(ValueError, match=message):
        evaluation_report(labels, probs)


def test_confusion_matrix_must_be_10x10(tmp_path):
    with pytest.raises(ValueError, match="must be 10x10"):
        plot_confusion_matrix([[1, 2], [3, 4]], str(tmp_path / "cm.png"))
