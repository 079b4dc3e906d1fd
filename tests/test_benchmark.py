"""The benchmark's smoke mode: real runs (plain Keras and the 2-worker job) on the committed sample,
checked for the structure of what it prints and writes, not for speed (the machine may be busy)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BENCHMARK = ROOT / "scripts" / "benchmark.py"
FIGURES = ("seconds_per_epoch", "samples_per_second", "start_to_first_step_s", "wall_s",
           "peak_rss_mb", "test_accuracy")


def benchmark(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARK), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(420)
def test_smoke_prints_ratios_to_plain_keras_and_writes_json_and_png(tmp_path):
    done = benchmark("--smoke", "--output", str(tmp_path), timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert [run["key"] for run in results["runs"]] == ["a", "c"] and results["epochs"] == 1
    plain, job = results["runs"]
    for run in results["runs"]:
        assert all(run[key] > 0 for key in FIGURES), run
        assert run["ratios"]["seconds_per_epoch"] == pytest.approx(
            run["seconds_per_epoch"] / plain["seconds_per_epoch"])
        assert 0.5 < run["test_accuracy"] <= 1  # 1 epoch on 3,000 digits: well above chance (0.1)
    assert all(ratio == pytest.approx(1.0) for ratio in plain["ratios"].values())
    assert job["workers"] == 2 and job["global_batch"] == 128 and job["learning_rates"] == [pytest.approx(1e-3)]
    assert 200 < job["peak_rss_mb"] < 8000  # a worker holds TensorFlow: hundreds of MB, not bytes
    assert job["start_to_first_step_s"] < job["wall_s"]
    assert {t["what"] for t in results["targets"]} >= {"2 workers at batch 128, seconds per epoch",
                                                       "start to first step, seconds"}

    png = (tmp_path / "benchmark.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    rows = [line for line in done.stdout.splitlines() if re.match(r"^[ac] ", line)]
    assert len(rows) == 2 and rows[0].count("(1.00x)") == len(FIGURES)
    assert re.search(r"target (MET |MISSED) run c: 2 workers at batch 128", done.stdout)


def test_bad_input_is_one_line_error_before_any_run(tmp_path):
    missing = benchmark("--data", str(tmp_path / "nope"), "--output", str(tmp_path), timeout=120)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert missing.stderr.count("\n") == 1 and "run a" not in missing.stdout
    no_baseline = benchmark("--runs", "b,c", "--output", str(tmp_path), timeout=120)
    assert no_baseline.returncode == 1
    assert no_baseline.stderr == "error: --runs must include a (the baseline) and name only " \
        "a, b, c, d512, d1024; got 'b,c'\n"
