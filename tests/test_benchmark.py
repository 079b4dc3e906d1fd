"""The benchmark's smoke mode: real runs (plain Keras and the 2-worker job) on the committed sample,
checked for the structure of what it prints and writes, not for speed (the machine may be busy)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, gpu_count

pytestmark = pytest.mark.ray  # every test here runs the job or starts Ray

BENCHMARK = ROOT / "scripts" / "benchmark.py"
FIGURES = ("seconds_per_epoch", "samples_per_second", "start_to_first_step_s", "wall_s",
           "peak_rss_mb", "test_accuracy", "console_lines")


def benchmark(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARK), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_gpu_benchmark_smoke_measures_scaling_against_plain_keras_and_writes_json_and_png(tmp_path):
    """scripts/gpu_benchmark.sh --smoke: its CPU-scaling invocation of benchmark.py (plain Keras, the
    job at 1 and 2 workers) on the sample; without a GPU it says it skipped the GPU comparison."""
    done = subprocess.run(["bash", "scripts/gpu_benchmark.sh", "--smoke", "--output", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^scaling efficiency .*: 1 workers 100%, 2 workers \d+%$", done.stdout, re.MULTILINE)
    if not gpu_count():
        assert "GPU comparison skipped" in done.stdout

    results = json.loads((tmp_path / "cpu" / "benchmark.json").read_text())
    assert [run["key"] for run in results["runs"]] == ["a", "w1", "w2"] and results["epochs"] == 1
    plain, _, job = results["runs"]
    for run in results["runs"]:
        assert all(run[key] > 0 for key in FIGURES), run
        assert run["ratios"]["seconds_per_epoch"] == pytest.approx(
            run["seconds_per_epoch"] / plain["seconds_per_epoch"])
        assert 0.5 < run["test_accuracy"] <= 1  # 1 epoch on 3,000 digits: well above chance (0.1)
    assert all(ratio == pytest.approx(1.0) for ratio in plain["ratios"].values())
    assert job["workers"] == 2 and job["global_batch"] == 128 and job["learning_rates"] == [pytest.approx(1e-3)]
    assert plain["console_lines"] > 0 and job["console_lines"] <= 30
    assert 200 < job["peak_rss_mb"] < 8000  # a worker holds TensorFlow: hundreds of MB, not bytes
    assert job["start_to_first_step_s"] < job["wall_s"]
    assert "in-process start to first step, seconds" in {t["what"] for t in results["targets"]}
    assert list(job["timeline"])[0] == "process_start" and job["timeline"]["first_step"] > 0
    assert job["cpu_s_per_epoch"]["ray::RayTrainWorker"] > 0  # the workers trained, and were sampled
    assert 0 <= job["non_worker_cpu_s_per_epoch"] < sum(job["cpu_s_per_epoch"].values())

    png = (tmp_path / "cpu" / "benchmark.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    rows = [line for line in done.stdout.splitlines() if re.match(r"^(a|w1|w2) ", line)]
    assert len(rows) == 3 and rows[0].count("(1.00x)") == len(FIGURES)
    assert re.search(r"^timeline w2: process_start 0.0s \| ray_up ", done.stdout, re.MULTILINE)
    assert "--threads 1" in plain["command"] and "--cpus-per-worker 1" in job["command"]


@pytest.mark.timeout(420)
def test_a_submitted_run_is_timed_from_ray_job_submit_on_a_cluster_started_for_it(tmp_path):
    done = benchmark("--smoke", "--runs", "a,s", "--output", str(tmp_path), timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    submitted = json.loads((tmp_path / "benchmark.json").read_text())["runs"][1]
    assert submitted["key"] == "s" and submitted["command"].split()[1:3] == ["job", "submit"]
    assert 0 < submitted["timeline"]["first_step"] < submitted["start_to_first_step_s"] < submitted["wall_s"]
    assert submitted["test_accuracy"] > 0.5
    assert re.search(r"target (MET |MISSED) run s: submitted start to first step", done.stdout)


def test_bad_input_is_one_line_error_before_any_run(tmp_path):
    missing = benchmark("--data", str(tmp_path / "nope"), "--output", str(tmp_path), timeout=120)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert missing.stderr.count("\n") == 1 and "run a" not in missing.stdout
    no_baseline = benchmark("--runs", "b,c", "--output", str(tmp_path), timeout=120)
    assert no_baseline.returncode == 1
    assert no_baseline.stderr.startswith("error: --runs must include a (the baseline) and name only a, b, c, ")
    assert no_baseline.stderr.endswith("; got 'b,c'\n") and no_baseline.stderr.count("\n") == 1


@pytest.mark.timeout(300)
def test_the_all_reduce_profile_times_the_step_and_names_its_collectives():
    """scripts/allreduce_profile.py at its smallest: the job's step in two processes on loopback, and
    the collective alone; no Ray. Checks what it prints, not how fast (the machine may be busy)."""
    done = subprocess.run([sys.executable, "scripts/allreduce_profile.py", "--variants", "step-bf16,reduce-tiny",
                           "--rounds", "1", "--repeat", "1", "--steps-per-call", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = done.stdout.splitlines()
    assert rows[-5] == "2 workers, global batch 128, not pinned; median of 1 passes:"
    assert re.fullmatch(r"step-bf16 +\d+\.\d\d ms/step wall +\d+\.\d\d CPU ms/step \(all processes\)", rows[-4])
    assert rows[-2:] == ["step-bf16: collective ops in the traced step: CollectiveReduceV2 of bfloat16",
                         "reduce-tiny: collective ops in the traced step: CollectiveReduceV2 of float32"]
