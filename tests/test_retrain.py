"""Scheduled retraining end to end: real jobs/retrain.py processes, a local Ray, the committed sample.

One store goes through a night's worth of history (5 trainings, about 6 minutes on 2 cores):
two runs started at once (one trains v1, the other exits), v2 on changed data and a better recipe
(with a SavedModel, which the canary loads too), data the checks refuse (no training), a run on
data with the 7s mislabelled (accepted with --accept-data-change) that the gate rejects by naming
digit 7, an unchanged rerun that trains nothing, then two --warm-start cycles: one kept (its parent
v2), one whose canary fails (the serving Python cannot load it), so current does not move.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE, job_env
from trainer.data.shards import content_hash, load_npz
from trainer.model import report
from trainer.promote import canary

RETRAIN = ROOT / "jobs" / "retrain.py"
GATE = ("--min-accuracy", "0.5")  # the sample's few epochs do not reach the production floor
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]  # the module fixture trains five times


def start(store, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RETRAIN), "--store", str(store), *GATE, *args],
                            cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def cut(path, train_rows: slice, mislabel_sevens: float = 0.0) -> str:
    """The sample with another cut of its training rows (the test split unchanged), and optionally
    that fraction of its 7s labelled 1."""
    with np.load(SAMPLE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["x_train"], arrays["y_train"] = arrays["x_train"][train_rows], arrays["y_train"][train_rows].copy()
    sevens = np.flatnonzero(arrays["y_train"] == 7)
    arrays["y_train"][sevens[:int(len(sevens) * mislabel_sevens)]] = 1
    np.savez(path, **arrays)
    return str(path)


def versions(store) -> list[str]:
    return sorted(os.listdir(store / "versions"))


def record(store, vid: str) -> dict:
    return json.loads((store / "versions" / vid / "version.json").read_text())


def added(steps: dict, after: str, before: str) -> str:
    """The one version a step registered: in the listing after it, not before."""
    (vid,) = sorted(set(steps[after]) - set(steps[before]))
    return vid


def current(store) -> str:
    return json.loads((store / "current.json").read_text())["version"]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    store = tmp / "store"
    changed = cut(tmp / "changed.npz", slice(0, 2800))
    tiny = cut(tmp / "tiny.npz", slice(0, 300))
    sevens = cut(tmp / "sevens.npz", slice(0, 2800), mislabel_sevens=0.6)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "bare")], check=True)
    steps = {}

    # Two runs started at once: only one may train.
    pair = [start(store, "--data", str(SAMPLE), "--epochs", "1", "--num-workers", "1") for _ in range(2)]
    steps["pair"] = [finish(p) for p in pair]
    steps["v1"] = versions(store)
    # New data and a longer recipe: better, so promoted.
    v2_args = ("--data", changed, "--epochs", "3", "--num-workers", "2", "--export-savedmodel")
    steps["v2"] = finish(start(store, *v2_args))
    steps["v2_versions"] = versions(store)
    # 300 rows where there were 2,800: refused before anything trains.
    steps["refused"] = finish(start(store, "--data", tiny, "--epochs", "1", "--num-workers", "1"), timeout=120)
    steps["refused_versions"] = versions(store)
    # v2's recipe on data with 60% of the 7s labelled 1: the data checks refuse it, an operator
    # accepts it, and the gate rejects the model it trains, naming digit 7.
    steps["worse"] = finish(start(store, *v2_args[2:], "--data", sevens, "--accept-data-change"))
    steps["worse_versions"], steps["worse_current"] = versions(store), current(store)
    # Nothing changed since v2: no training.
    steps["unchanged"] = finish(start(store, *v2_args), timeout=180)
    steps["unchanged_versions"] = versions(store)
    # Warm start from the current version (v2), one epoch on the whole sample: kept. These two steps
    # are about lineage and the canary, so the gate is loose (--alpha 1e-6): a one-epoch warm start
    # on 3,000 digits can move one digit's recall by 10 points, which the
    # 1,000-image test split can call significant (measured: digit 3, 0.913 -> 0.804).
    loose = ("--alpha", "1e-6")
    steps["warm"] = finish(start(store, "--data", str(SAMPLE), "--warm-start", "--warm-epochs", "1",
                                 "--num-workers", "2", *loose))
    steps["warm_versions"] = versions(store)
    # Warm again, another seed, and a serving Python without the packages: the canary fails.
    steps["canary"] = finish(start(store, "--data", str(SAMPLE), "--warm-start", "--warm-epochs", "1",
                                   "--num-workers", "2", "--seed", "7", *loose,
                                   "--canary-python", str(tmp / "bare" / "bin" / "python")))
    steps["canary_versions"] = versions(store)
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
    # The gate scores the saved file: it must score as the trained model did in the driver.
    assert second["gate"]["accuracy"] == pytest.approx(second["test_accuracy"], abs=1e-6)
    assert second["data"]["profile"]["train_rows"] == 2800 and second["data_checks"]["problems"] == []
    # v2's rows are v1's first 2,800: v1's model sees no shift in them.
    assert "shift" not in first["data_checks"] and second["data_checks"]["shift"]["p_value"] > 0.5
    for vid, rec, extra in ((v1, first, []), (v2, second, ["mnist_savedmodel"])):
        folder = store / "versions" / vid
        assert sorted(os.listdir(folder)) == sorted(
            ["metrics.json", "mnist.h5", "mnist.keras", "shift_reference.npy", "version.json", *report.FILES,
             *extra])  # + report, plots, and the BBSD reference the next cycle tests against
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["test_accuracy"] == rec["test_accuracy"]
        assert rec["started"] <= rec["finished"] and rec["git_commit"]
        assert rec["config"]["run_name"] == vid
    assert second["config"]["num_workers"] == 2 and second["config"]["epochs"] == 3
    assert os.listdir(store / "staging") == []


def test_data_the_checks_refuse_trains_nothing_and_exits_4(night):
    store, _, _, steps = night
    code, out = steps["refused"]
    assert code == 4, out[-3000:]
    vid = added(steps, "refused_versions", "v2_versions")
    refused = record(store, vid)
    assert refused["decision"] == "refused" and refused["reason"].startswith("rows: 2800 -> 300 training rows")
    assert f"refused {vid}: rows: 2800 -> 300" in out and "epoch" not in out
    assert os.listdir(store / "versions" / vid) == ["version.json"]


def test_a_model_worse_on_one_digit_is_rejected_and_the_digit_named(night):
    store, _, _, steps = night
    code, out = steps["worse"]
    assert code == 3, out[-4000:]
    vid = added(steps, "worse_versions", "refused_versions")
    rejected = record(store, vid)
    assert rejected["decision"] == "rejected" and rejected["data"]["train_rows"] == 2800
    assert "digit 7: recall " in rejected["reason"] and f"rejected {vid}" in out
    assert rejected["gate"]["largest_digit_drop"]["digit"] == 7
    assert rejected["gate"]["digits"]["7"]["p_worse_holm"] < 0.025
    assert rejected["data_checks"]["accepted"] and "--accept-data-change: training despite" in out
    assert any(p.startswith("digits: digit 7") for p in rejected["data_checks"]["problems"])
    assert "canary" not in rejected  # only a model that passed the gate is loaded by the canary
    assert steps["worse_current"] == steps["v2_versions"][-1]
    assert (store / "versions" / vid / "mnist.keras").exists()  # kept, for inspection


def test_an_unchanged_rerun_trains_nothing_and_exits_0(night):
    store, _, _, steps = night
    code, out = steps["unchanged"]
    assert code == 0, out[-3000:]
    assert "nothing changed since the current version" in out
    assert "test accuracy" not in out  # no training, no evaluation
    assert steps["unchanged_versions"] == steps["worse_versions"]


def test_a_warm_start_cycle_records_its_parent_and_a_failed_canary_keeps_current(night):
    store, _, _, steps = night
    code, out = steps["warm"]
    assert code == 0, out[-4000:]
    v2 = steps["v2_versions"][-1]
    warm = added(steps, "warm_versions", "worse_versions")
    first = record(store, warm)
    assert first["parent"] == v2 and first["decision"] == "passed"
    assert first["config"]["init_from"] == "store:current" and first["config"]["epochs"] == 1
    assert f"starting from {v2}" in out and f"init: weights from {store / 'versions' / v2 / 'mnist.keras'}" in out
    metrics = json.loads((store / "versions" / warm / "metrics.json").read_text())
    assert metrics["init"] == {"from": str(store / "versions" / v2 / "mnist.keras"), "version": v2, "optimizer": False}
    cold = json.loads((store / "versions" / steps["v1"][0] / "metrics.json").read_text())
    assert metrics["epochs"][0]["loss"] < cold["epochs"][0]["loss"] / 2  # v1's first epoch was a cold start

    code, out = steps["canary"]
    assert code == 5, out[-4000:]
    failed = added(steps, "canary_versions", "warm_versions")
    second = record(store, failed)
    assert second["parent"] == warm and second["decision"] == "rejected" and current(store) == warm
    assert second["reason"].startswith("canary: a fresh process could not load and run the model: ")
    assert "No module named 'numpy'" in second["reason"] and f"rejected {failed}: canary:" in out
    assert second["gate"]["alpha"] == 1e-6 and second["gate"]["overall"]["p_worse"] >= 5e-7  # it passed the gate first


def test_the_canary_loads_each_format_and_catches_a_model_that_predicts_otherwise(night):
    store, _, _, steps = night
    v1, v2 = steps["v2_versions"]
    promoted = record(store, v2)["canary"]
    assert promoted["formats"] == ["mnist.keras", "mnist_savedmodel"] and promoted["images"] == canary.IMAGES
    assert promoted["max_difference"] <= canary.PROBABILITY_TOLERANCE
    assert record(store, v1)["canary"]["formats"] == ["mnist.keras"]
    # v1's predictions are not v2's: the canary must say so (v2's own files, v1's expected answers)
    import keras

    images = load_npz(str(SAMPLE)).x_test[:canary.IMAGES]
    pixels = images.reshape(-1, 784).astype("float32") / 255
    v1_probs = keras.saving.load_model(store / "versions" / v1 / "mnist.keras").predict(pixels, verbose=0)
    with pytest.raises(canary.CanaryError, match=r"^canary: mnist.keras loaded in a fresh process predicts \d+ of 512 "):
        canary.check(str(store / "versions" / v2), images, v1_probs)


def test_list_shows_every_version_with_its_status(night):
    store, _, _, steps = night
    code, out = steps["list"]
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    v1, v2 = steps["v2_versions"]
    refused = added(steps, "refused_versions", "v2_versions")
    worse = added(steps, "worse_versions", "refused_versions")
    warm = added(steps, "warm_versions", "worse_versions")
    failed = added(steps, "canary_versions", "warm_versions")
    assert "promoted earlier" in rows[v1] and "promoted earlier" in rows[v2] and "rejected" in rows[worse]
    assert "current" in rows[warm] and "rejected" in rows[failed] and "refused" in rows[refused]
    header = out.splitlines()[0]
    column = header.index("PARENT")
    assert [rows[v][column:].split()[0] for v in (v1, v2, warm, failed)] == ["-", "-", v2, warm]
    gate = record(store, worse)["gate"]["overall"]
    assert rows[worse][header.index("VS CURRENT"):].split()[:3] == [
        f"+{gate['new_only']}/-{gate['old_only']}", f"p={gate['p_worse']:.2g}", "7:"]
    assert record(store, v2)["data"]["content_sha256"][:12] in rows[v2]
    print(out)  # shown with -s: the README's example listing
