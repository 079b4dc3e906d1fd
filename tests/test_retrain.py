"""Scheduled retraining end to end: real jobs/retrain.py processes, a local Ray, the committed sample.

One store goes through a night's worth of history (5 trainings, about 6 minutes on 2 cores):
two runs started at once (one trains v1, the other exits), v2 on changed data and a better recipe,
a worse run the gate rejects, an unchanged rerun that trains nothing, then two --warm-start cycles:
one kept (its parent v2), one the gate rejects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE, job_env
from trainer import report
from trainer.data import content_hash, load_npz

RETRAIN = ROOT / "jobs" / "retrain.py"
GATE = ("--min-accuracy", "0.5")  # the sample's few epochs do not reach the production floor
pytestmark = pytest.mark.timeout(1800)  # the module fixture trains three times


def start(store, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RETRAIN), "--store", str(store), *GATE, *args],
                            cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def cut(path, train_rows: slice) -> str:
    """The sample with another cut of its training rows (the test split unchanged)."""
    with np.load(SAMPLE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["x_train"], arrays["y_train"] = arrays["x_train"][train_rows], arrays["y_train"][train_rows]
    np.savez(path, **arrays)
    return str(path)


def versions(store) -> list[str]:
    return sorted(os.listdir(store / "versions"))


def record(store, vid: str) -> dict:
    return json.loads((store / "versions" / vid / "version.json").read_text())


def current(store) -> str:
    return json.loads((store / "current.json").read_text())["version"]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    store = tmp / "store"
    changed = cut(tmp / "changed.npz", slice(0, 2700))
    tiny = cut(tmp / "tiny.npz", slice(0, 300))
    steps = {}

    # Two runs started at once: only one may train.
    pair = [start(store, "--data", str(SAMPLE), "--epochs", "1", "--num-workers", "1") for _ in range(2)]
    steps["pair"] = [finish(p) for p in pair]
    steps["v1"] = versions(store)
    # New data and a longer recipe: better, so promoted.
    v2_args = ("--data", changed, "--epochs", "3", "--num-workers", "2")
    steps["v2"] = finish(start(store, *v2_args))
    steps["v2_versions"] = versions(store)
    # One epoch on 300 digits: worse, so rejected.
    steps["worse"] = finish(start(store, "--data", tiny, "--epochs", "1", "--num-workers", "1"))
    steps["worse_versions"], steps["worse_current"] = versions(store), current(store)
    # Nothing changed since v2: no training.
    steps["unchanged"] = finish(start(store, *v2_args), timeout=180)
    steps["unchanged_versions"] = versions(store)
    # Warm start from the current version (v2), one epoch on the whole sample: kept by the gate
    # (a loose tolerance: this test is about lineage; the gate's margin is tested above).
    steps["warm"] = finish(start(store, "--data", str(SAMPLE), "--warm-start", "--warm-epochs", "1",
                                 "--num-workers", "2", "--tolerance", "0.05"))
    steps["warm_versions"] = versions(store)
    # Warm again at a learning rate that wrecks the weights: the gate still rejects it.
    steps["wrecked"] = finish(start(store, "--data", str(SAMPLE), "--warm-start", "--warm-epochs", "1",
                                    "--num-workers", "1", "--learning-rate", "0.5"))
    steps["wrecked_versions"] = versions(store)
    steps["list"] = finish(start(store, "--list"), timeout=60)
    return store, changed, tiny, steps


def test_two_runs_started_at_once_train_once(night):
    store, _, _, steps = night
    (code_a, out_a), (code_b, out_b) = steps["pair"]
    assert (code_a, code_b) == (0, 0), out_a[-3000:] + out_b[-3000:]
    trained = [out for out in (out_a, out_b) if "promoted " in out]
    skipped = [out for out in (out_a, out_b) if "another retraining run holds" in out]
    assert len(trained) == 1 and len(skipped) == 1, out_a[-2000:] + out_b[-2000:]
    assert "test accuracy" not in skipped[0] and "not starting another" in skipped[0]
    assert len(steps["v1"]) == 1


def test_second_version_on_changed_data_is_promoted_and_is_the_better_one(night):
    store, changed, _, steps = night
    code, out = steps["v2"]
    assert code == 0, out[-4000:]
    (v1,) = steps["v1"]
    v2 = next(v for v in steps["v2_versions"] if v != v1)
    assert steps["v2_versions"] == sorted([v1, v2])  # ids sort by time
    first, second = record(store, v1), record(store, v2)
    assert first["decision"] == second["decision"] == "passed"
    assert first["data"]["content_sha256"] == content_hash(load_npz(str(SAMPLE)))
    assert second["data"]["content_sha256"] == content_hash(load_npz(changed))
    assert second["test_accuracy"] > first["test_accuracy"]
    # The baseline is v1's model re-scored on v2's test split (the same images here).
    assert second["gate"]["baseline_version"] == v1
    assert second["gate"]["baseline_accuracy"] == pytest.approx(first["test_accuracy"], abs=1e-6)
    for vid, rec in ((v1, first), (v2, second)):
        folder = store / "versions" / vid
        assert sorted(os.listdir(folder)) == sorted(
            ["metrics.json", "mnist.h5", "mnist.keras", "version.json", *report.FILES])  # + report, plots
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["test_accuracy"] == rec["test_accuracy"]
        assert rec["started"] <= rec["finished"] and rec["git_commit"]
        assert rec["config"]["run_name"] == vid
    assert second["config"]["num_workers"] == 2 and second["config"]["epochs"] == 3
    assert os.listdir(store / "staging") == []


def test_a_worse_run_is_rejected_and_current_does_not_move(night):
    store, _, _, steps = night
    code, out = steps["worse"]
    assert code == 3, out[-4000:]
    new = sorted(set(steps["worse_versions"]) - set(steps["v2_versions"]))
    assert len(new) == 1
    rejected = record(store, new[0])
    assert rejected["decision"] == "rejected" and rejected["data"]["train_rows"] == 300
    assert "below" in rejected["reason"] and f"rejected {new[0]}" in out
    assert steps["worse_current"] == steps["v2_versions"][-1]
    assert (store / "versions" / new[0] / "mnist.keras").exists()  # kept, for inspection


def test_an_unchanged_rerun_trains_nothing_and_exits_0(night):
    store, _, _, steps = night
    code, out = steps["unchanged"]
    assert code == 0, out[-3000:]
    assert "nothing changed since the current version" in out
    assert "test accuracy" not in out  # no training, no evaluation
    assert steps["unchanged_versions"] == steps["worse_versions"]


def test_a_warm_start_cycle_records_its_parent_and_the_gate_still_rejects_a_worse_one(night):
    store, _, _, steps = night
    code, out = steps["warm"]
    assert code == 0, out[-4000:]
    v2 = steps["v2_versions"][-1]
    (warm,) = sorted(set(steps["warm_versions"]) - set(steps["worse_versions"]))
    first = record(store, warm)
    assert first["parent"] == v2 and first["decision"] == "passed"
    assert first["config"]["init_from"] == "store:current" and first["config"]["epochs"] == 1
    assert f"starting from {v2}" in out and f"init: weights from {store / 'versions' / v2 / 'mnist.keras'}" in out
    metrics = json.loads((store / "versions" / warm / "metrics.json").read_text())
    assert metrics["init"] == {"from": str(store / "versions" / v2 / "mnist.keras"), "version": v2, "optimizer": False}
    cold = json.loads((store / "versions" / steps["v1"][0] / "metrics.json").read_text())
    assert metrics["epochs"][0]["loss"] < cold["epochs"][0]["loss"] / 2  # v1's first epoch was a cold start

    code, out = steps["wrecked"]
    assert code == 3, out[-4000:]
    (wrecked,) = sorted(set(steps["wrecked_versions"]) - set(steps["warm_versions"]))
    second = record(store, wrecked)
    assert second["parent"] == warm and second["decision"] == "rejected" and current(store) == warm


def test_list_shows_every_version_with_its_status(night):
    store, _, _, steps = night
    code, out = steps["list"]
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    v1, v2, worse, warm, wrecked = steps["wrecked_versions"]
    assert "promoted earlier" in rows[v1] and "promoted earlier" in rows[v2] and "rejected" in rows[worse]
    assert "current" in rows[warm] and "rejected" in rows[wrecked]
    column = out.splitlines()[0].index("PARENT")
    assert [rows[v][column:].split()[0] for v in (v1, v2, warm, wrecked)] == ["-", "-", v2, warm]
    assert record(store, v2)["data"]["content_sha256"][:12] in rows[v2]
    print(out)  # shown with -s: the README's example listing
