"""scripts/make_big_mnist.py on the committed sample: the layout the job reads, the hash, distortions
that keep their digit, the same data for the same flags, and memory that does not grow with --rows."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from tests.conftest import ROOT, SAMPLE
from trainer.data import shards
from trainer.data.mnist import content_hash

spec = importlib.util.spec_from_file_location("make_big_mnist", ROOT / "scripts" / "make_big_mnist.py")
make_big_mnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_big_mnist)
SOURCE = shards.load(str(SAMPLE))  # 3,000 train + 1,000 test


def make(path, rows, *flags):
    """In this process (one process distorting: a pool's processes import the script by its path)."""
    return make_big_mnist.main(["--rows", str(rows), "--output", str(path), "--data", str(SAMPLE),
                                "--processes", "1", *flags])


def test_the_rows_are_the_originals_then_distortions_that_keep_their_digit(tmp_path, capsys):
    assert make(tmp_path / "big", 7500, "--rows-per-file", "2000") == 0
    assert "7,500 training rows" in capsys.readouterr().out
    manifest = shards.read_manifest(str(tmp_path / "big"))
    big = shards.load_parquet(str(tmp_path / "big"))  # checks the manifest's hash against the rows read
    assert manifest.content_sha256 == content_hash(big)
    assert [f["rows"] for f in manifest.files("train")] == [2000, 2000, 2000, 1500]
    (x, y), (x0, y0) = big.split("train"), SOURCE.split("train")
    source = np.arange(7500) % 3000
    assert np.array_equal(y, y0[source]) and np.array_equal(x[:3000], x0)
    assert all(np.array_equal(a, b) for a, b in zip(big.split("test"), SOURCE.split("test")))
    distorted, original = x[3000:].astype(float), x0[source[3000:]].astype(float)
    changed = np.abs(distorted - original).mean(axis=(1, 2))
    assert (changed > 0).all()  # every copy moved
    ink = distorted.sum(axis=(1, 2)) / original.sum(axis=(1, 2))
    assert 0.7 < np.median(ink) < 1.3  # the stroke is kept, not cropped or smeared away
    # still the same digit: a 3-nearest-neighbour classifier on the 3,000 originals names the
    # distorted copies nearly as well as unseen test digits (measured 0.85 and 0.91)
    knn = KNeighborsClassifier(3).fit(x0.reshape(len(x0), -1), y0)
    x_test, y_test = SOURCE.split("test")
    assert knn.score(x[3000:].reshape(4500, -1), y[3000:]) > knn.score(x_test.reshape(len(x_test), -1), y_test) - 0.15


def test_the_same_flags_give_the_same_data_and_fewer_rows_a_prefix(tmp_path):
    assert make(tmp_path / "a", 6000, "--rows-per-file", "1500") == 0
    assert make(tmp_path / "b", 6000, "--rows-per-file", "1500") == 0
    assert make(tmp_path / "c", 4500, "--rows-per-file", "1500") == 0
    assert make(tmp_path / "d", 6000, "--rows-per-file", "1500", "--seed", "1") == 0
    a, b, c, d = (shards.read_manifest(str(tmp_path / n)).content_sha256 for n in "abcd")
    assert a == b and len({a, c, d}) == 3
    xa, xc = shards.load_parquet(str(tmp_path / "a")).split("train")[0], shards.load_parquet(str(tmp_path / "c")).split("train")[0]
    assert np.array_equal(xa[:4500], xc)  # each file from its own seed: a file can be made again alone


def test_processes_make_the_same_data_as_one(tmp_path):
    assert make(tmp_path / "one", 9000, "--rows-per-file", "1000") == 0
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_big_mnist.py"), "--rows", "9000",
                          "--rows-per-file", "1000", "--processes", "3", "--data", str(SAMPLE),
                          "--output", str(tmp_path / "three")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "3 processes" in run.stdout
    one, three = (shards.read_manifest(str(tmp_path / n)).content_sha256 for n in ("one", "three"))
    assert one == three and three in run.stdout


def test_memory_does_not_grow_with_the_rows(tmp_path):
    peaks = []
    for rows in (4000, 16000):
        tracemalloc.start()
        assert make(tmp_path / f"rows-{rows}", rows, "--rows-per-file", "1000") == 0
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0], peaks  # 4x the rows; only the labels (a byte a row) grow


@pytest.mark.parametrize("flags, code, message", [
    (["--rows", "0"], 2, "--rows, --rows-per-file and --processes must be at least 1"),
    (["--rows", "10", "--data", "/nonexistent/mnist"], 1, "/nonexistent/mnist"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, code, message):
    assert make_big_mnist.main([*flags, "--output", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    assert make(tmp_path / "out", 100) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep").read_text() == "mine"
