"""`python -m trainer.serve.predict` on real MNIST digits saved as PNG and JPEG files, as a user would."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SAMPLE
from trainer.config import Config
from trainer.model.images import mnist_like
from trainer.model.network import build_model, preprocess
from trainer.serve.predict import main

CONFIDENT = 0.99  # digits the model gets right this surely in 28x28 form must survive preprocessing


def pick_confident_digits(probs: np.ndarray, labels: np.ndarray, count: int = 8) -> list[int]:
    """Indices of correctly classified, confident test digits, one per label first."""
    good = [i for i in np.argsort(-probs.max(axis=1)) if probs[i].argmax() == labels[i]
            and probs[i].max() >= CONFIDENT]
    one_per_label = list({int(labels[i]): int(i) for i in reversed(good)}.values())
    rest = [int(i) for i in good if i not in one_per_label]
    return (one_per_label + rest)[:count]


def write_variants(directory: Path, name: str, digit: np.ndarray) -> list[Path]:
    """One 28x28 digit as four files: as-is PNG, inverted PNG, and bigger off-centre PNG and JPEG."""
    light, dark = Image.fromarray(digit), Image.fromarray(255 - digit)
    big_light = Image.new("L", (100, 100), 0)
    big_light.paste(light.resize((70, 70), Image.Resampling.BICUBIC), (6, 24))
    big_dark = Image.new("RGB", (56, 80), (255, 255, 255))  # a colour JPEG of dark ink on paper
    big_dark.paste(dark.resize((42, 42), Image.Resampling.BICUBIC).convert("RGB"), (10, 30))
    files = {f"{name}_light.png": light, f"{name}_dark.png": dark,
             f"{name}_big_light.png": big_light, f"{name}_big_dark.jpg": big_dark}
    for file, image in files.items():
        image.save(directory / file, quality=92)  # quality: read by the JPEG writer, ignored by PNG
    return [directory / file for file in files]


def printed_digits(stdout: str) -> dict[str, int]:
    """`path: 7  (7 0.991, 1 0.006, 9 0.001)` lines -> {path: 7}."""
    lines = [line.split(": ", 1) for line in stdout.strip().splitlines()]
    return {path: int(rest.split()[0]) for path, rest in lines}


def difference_up_to_one_pixel(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference at the best shift of at most one pixel: centring by mass rounds,
    and a centre of mass near a half pixel may land either side."""
    return min(float(np.abs(np.roll(a, (dy, dx), axis=(0, 1)) - b).mean())
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A trained model saved as .keras, and real test digits written as image files with labels."""
    directory = tmp_path_factory.mktemp("predict")
    with np.load(SAMPLE) as npz:
        x, y = preprocess(npz["x_train"], npz["y_train"])
        images, labels = npz["x_test"], npz["y_test"]
    model = build_model(Config())
    model.fit(x, y, batch_size=128, epochs=2, verbose=0)
    model_path = directory / "mnist.keras"
    model.save(model_path)
    probs = model.predict(preprocess(images, labels)[0], verbose=0)
    expected = {}
    for i in pick_confident_digits(probs, labels):
        for path in write_variants(directory, f"digit{i}", images[i]):
            expected[str(path)] = int(labels[i])
    return str(model_path), expected, images


def test_every_size_format_and_polarity_is_classified(case, capsys):
    model_path, expected, _ = case
    assert main([model_path, *expected]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert printed_digits(out) == expected
    first = out.splitlines()[0]
    assert first.count(",") == 2 and first.endswith(")")  # the top three, e.g. (7 0.991, 1 0.006, 9 0.001)


def test_json_is_one_document(case, capsys):
    model_path, expected, _ = case
    files = list(expected)[:4]
    assert main([model_path, *files, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == files
    for result in results:
        assert result["error"] is None and result["digit"] == expected[result["file"]]
        probabilities = [t["probability"] for t in result["top3"]]
        assert result["top3"][0]["digit"] == result["digit"] and len(probabilities) == 3
        assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] >= 0.9


def test_bad_files_are_reported_one_line_each_and_the_rest_still_classified(case, tmp_path, capsys):
    model_path, expected, _ = case
    good = list(expected)[:2]
    (tmp_path / "notes.txt").write_text("seven, I think\n")
    (tmp_path / "empty.png").write_bytes(b"")
    big_png = next(path for path in expected if path.endswith("_big_light.png"))
    raw = Path(big_png).read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[:len(raw) // 2])
    bad = {str(tmp_path / "notes.txt"): "not a PNG or JPEG image",
           str(tmp_path / "empty.png"): "empty file",
           str(tmp_path / "truncated.png"): "truncated or corrupt PNG image",
           str(tmp_path / "missing.png"): "no such file"}
    assert main([model_path, good[0], *bad, good[1]]) == 1
    out, err = capsys.readouterr()
    assert printed_digits(out) == {path: expected[path] for path in good}
    errors = err.strip().splitlines()
    assert len(errors) == len(bad)
    for line, (path, reason) in zip(errors, bad.items()):
        assert line.startswith(f"error: {path}: {reason}"), line

    assert main([model_path, good[0], *bad, "--json"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert results[0]["digit"] == expected[good[0]] and results[0]["error"] is None
    for result, reason in zip(results[1:], bad.values()):
        assert result["digit"] is None and result["error"].startswith(reason)


def test_a_missing_model_is_a_usage_error_with_one_line(case, tmp_path, capsys):
    _, expected, _ = case
    assert main([str(tmp_path / "nope.keras"), *list(expected)[:1]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: model file ") and "not found" in err


def test_a_file_that_is_not_a_model_is_a_usage_error(case, tmp_path, capsys):
    _, expected, _ = case
    (tmp_path / "fake.keras").write_text("not a zip")
    assert main([str(tmp_path / "fake.keras"), *list(expected)[:1]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a loadable Keras model" in err


def test_mnist_like_leaves_an_mnist_digit_almost_unchanged(case):
    _, _, images = case
    for digit in images[:50]:
        pixels = mnist_like(Image.fromarray(digit))
        assert pixels.shape == (784,) and pixels.dtype == np.float32
        assert pixels.min() >= 0 and pixels.max() == pytest.approx(1.0)
        assert difference_up_to_one_pixel(pixels.reshape(28, 28), digit / 255) < 0.02


def test_mnist_like_ignores_polarity_and_centres_by_mass(case):
    _, _, images = case
    digit = images[0]
    assert np.allclose(mnist_like(Image.fromarray(255 - digit)), mnist_like(Image.fromarray(digit)))
    page = Image.new("L", (300, 200), 230)  # grey paper, the digit small and in a corner
    page.paste(Image.fromarray(255 - digit).resize((56, 56)).point(lambda v: v * 0.9), (10, 130))
    field = mnist_like(page).reshape(28, 28)
    rows, cols = np.flatnonzero(field.any(axis=1)), np.flatnonzero(field.any(axis=0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20  # longer side scaled to 20 px
    ys, xs = np.indices(field.shape)
    centre = ((ys * field).sum() / field.sum(), (xs * field).sum() / field.sum())
    assert np.allclose(centre, (14, 14), atol=0.6)


def test_a_blank_page_is_not_a_digit():
    with pytest.raises(ValueError, match="no digit found"):
        mnist_like(Image.new("RGB", (64, 64), (250, 250, 250)))
