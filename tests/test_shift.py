"""BBSD (trainer/data/shift.py) on outputs with a known answer, and scripts/shift_power.py at its
smallest on the committed sample (a real model, real transforms; no Ray)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE
from trainer.data.shift import DETECTOR, bbsd, sample_rows


def softmax_like(rng, rows: int, shift: float = 0.0) -> np.ndarray:
    logits = rng.normal(0.0, 1.0, (rows, 10))
    logits[:, 3] += shift  # digit 3's outputs move
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_the_same_distribution_passes_at_about_the_stated_level():
    """Under no shift the corrected p-value is at or above alpha in about 1 - alpha of draws (the
    Bonferroni correction is conservative, so fewer false alarms, never more)."""
    rng = np.random.default_rng(0)
    reference = softmax_like(rng, 2000)
    alarms = [bbsd(reference, softmax_like(rng, 1000)).p_value < 0.05 for _ in range(200)]
    assert np.mean(alarms) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 200)  # within 3 standard errors


def test_a_shift_in_one_class_is_found_named_and_described():
    rng = np.random.default_rng(1)
    found = bbsd(softmax_like(rng, 2000), softmax_like(rng, 1000, shift=0.5))
    assert found.p_value < 1e-6 and found.moved()[0] == 3
    assert found.p_value == min(1.0, 10 * min(found.p_values))  # Bonferroni over the ten classes
    line = found.describe(0.01)
    assert line.startswith(f"shift: {DETECTOR}: largest D {found.statistic:.3f}") and "< alpha 0.01" in line
    assert "moved most: digits 3 (D" in line and "1000 arriving rows against 2000" in line
    assert json.loads(json.dumps(found.to_dict()))["p_value"] == found.p_value


def test_outputs_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="same classes"):
        bbsd(np.zeros((5, 10)), np.zeros((5, 9)))
    with pytest.raises(ValueError, match="at least one row"):
        bbsd(np.zeros((0, 10)), np.zeros((5, 10)))


def test_a_fixed_sample_is_the_same_for_the_same_seed():
    assert np.array_equal(sample_rows(100, 10, seed=4), sample_rows(100, 10, seed=4))
    assert len(np.unique(sample_rows(100, 10, seed=4))) == 10 and list(sample_rows(5, 10, seed=4)) == [0, 1, 2, 3, 4]


def test_the_power_script_prints_a_row_per_shift_and_writes_json(tmp_path):
    out = tmp_path / "power.json"
    done = subprocess.run([sys.executable, "scripts/shift_power.py", "--data", str(SAMPLE), "--reference", "1000",
                           "--sizes", "200", "--draws", "2", "--null-draws", "2", "--epochs", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    names = [row["shift"] for row in table["rows"]]
    assert names[:2] == ["none (training split)", "none, unseen (test split)"] and len(names) == 2 + 4 * 3 * 3 + 2
    assert all(0 <= v <= 1 for row in table["rows"] for v in row["bbsd"] + row["checks"])
    large = [row["bbsd"][0] for row in table["rows"] if row["shift"] == "noise large" and row["images"] == "100%"]
    assert large == [1.0]  # noise of std 100 on every image: caught in both draws
    assert len(done.stdout.splitlines()) == 2 + len(names)  # the header, a line per row, the summary


def test_the_power_script_refuses_bad_flags_in_one_line():
    done = subprocess.run([sys.executable, "scripts/shift_power.py", "--data", str(SAMPLE), "--alpha", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: --alpha")
