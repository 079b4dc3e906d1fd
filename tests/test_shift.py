"""BBSD (trainer/data/shift.py) on outputs with a known answer; scripts/shift_power.py at its smallest
on the committed sample, and its core on full MNIST (slow); the shift check in real retraining cycles
on a store whose current version holds a real model (a refusal needs no Ray; an accepted shift trains
on Ray); and mnist-serve's window of answers (trainer/serve/drift.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE, job_env
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



@pytest.mark.slow
def test_on_full_mnist_false_alarms_stay_rare_and_every_large_shift_is_caught(full_mnist):
    """The power table's smallest meaningful version (the whole table: scripts/shift_power.py): the
    job's model on full MNIST, the reference its outputs on 10,000 of its training rows, draws from the
    other 50,000. False alarms at most 5% at the default alpha; each large shift, on half the images or
    all of them, caught in every draw of 10,000."""
    from trainer.data import shards
    from trainer.data.shift import ALPHA

    power = load_power_script()
    data = shards.load(full_mnist)
    bench = power.Bench(data, power.train_model(data, epochs=2), 10_000, ALPHA, seed=0)
    alarms = [bench.rates(size, draws, bench.null_pick)[0] for size, draws in ((1_000, 100), (10_000, 20))]
    assert max(alarms) <= 0.05, alarms
    rng = np.random.default_rng(1)
    for kind, levels in (("noise", power.NOISE), ("rotation", power.ROTATION), ("translation", power.TRANSLATION),
                         ("zoom", power.ZOOM)):
        shifted = power.transform(bench.x, kind, levels["large"], rng)
        outputs = bench.outputs(shifted)
        for fraction in (0.5, 1.0):
            caught, _ = bench.rates(10_000, 5, bench.shifted_pick(shifted, outputs, fraction))
            assert caught == 1.0, (kind, fraction, caught)

# ---- in a retraining cycle: the current version's reference, and a refusal before training ------

def load_power_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("shift_power", ROOT / "scripts" / "shift_power.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    """A store whose current version holds a real model (the job's, 2 epochs of plain Keras on the
    sample), its data profile, and its BBSD reference, as a cycle keeps them."""
    from trainer.common.clock import iso, utc_now
    from trainer.data.checks import profile
    from trainer.data.shards import load_npz
    from trainer.data.shift import REFERENCE
    from trainer.promote import promotion
    from trainer.store.model_store import Store
    from trainer.store.record import VersionRecord
    from trainer.store.versions import PASSED, new_version_id

    sample = load_npz(str(SAMPLE))
    model = load_power_script().train_model(sample, epochs=2)
    store = Store(str(tmp_path_factory.mktemp("shift") / "store"))
    store.create()
    vid = new_version_id()
    staging = store.new_staging(vid)
    model.save(f"{staging}/mnist.keras")
    promotion.keep_reference(model, sample, f"{staging}/{REFERENCE}")
    store.register(VersionRecord(vid, decision=PASSED, started=iso(utc_now()),
                                 data={"content_sha256": "a" * 64, "profile": profile(sample)}))
    store.promote(vid)
    return store, vid, model, sample


def shifted(sample, kind: str, level: float, fraction: float, seed: int = 0):
    """The sample with `fraction` of its training images moved (rotated, translated...)."""
    from trainer.data.mnist import Mnist

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(sample.y_train), size=int(fraction * len(sample.y_train)), replace=False)
    x = sample.x_train.copy()
    x[rows] = load_power_script().transform(x[rows], kind, level, rng)
    return Mnist(x, sample.y_train, sample.x_test, sample.y_test)


def test_the_same_data_passes_and_a_version_keeps_its_reference(current):
    from trainer.data.shift import REFERENCE, SAMPLE_ROWS
    from trainer.promote import promotion

    store, vid, model, sample = current
    reference = np.load(f"{store.version_dir(vid)}/{REFERENCE}")
    assert reference.shape == (min(SAMPLE_ROWS, len(sample.y_train)), 10) and reference.dtype == np.float32
    found = promotion.check_shift(store, vid, model, sample)
    assert found.p_value == 1.0 and found.statistic < 1e-3  # the same rows through the same model


def rotated_day(store, vid: str, sample, path) -> str:
    """The sample with half its training images rotated by up to 40 degrees, written as a day's .npz:
    the label mix and the pixel statistics barely move (today's checks pass it), the model's outputs do."""
    from trainer.data.checks import Limits, compare, profile

    moved = shifted(sample, "rotation", 40.0, 0.5)
    assert compare(store.record(vid).data["profile"], profile(moved), Limits()) == []
    np.savez(path, x_train=moved.x_train, y_train=moved.y_train, x_test=moved.x_test, y_test=moved.y_test)
    return str(path)


def test_a_shift_the_thresholds_miss_is_refused_with_exit_4_in_one_line(current, tmp_path):
    store, vid, _, sample = current
    data = rotated_day(store, vid, sample, tmp_path / "rotated.npz")
    run = subprocess.run([sys.executable, "jobs/retrain.py", "--store", store.root, "--data", data],
                         cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 4, run.stdout + run.stderr
    (line,) = run.stdout.splitlines()
    assert line.startswith("refused ") and f": shift: {DETECTOR}: largest D " in line and "< alpha 0.01" in line
    assert "moved most: digits " in line and "--accept-data-change" in line
    assert [x for x in run.stderr.splitlines() if not x.startswith("preparing data")] == []
    (refused,) = [r for r in store.records() if r.version != vid]
    assert refused.decision == "refused" and refused.data_checks["shift"]["p_value"] < 0.01
    assert refused.data_checks["shift"]["alpha"] == 0.01 and store.current_id() == vid


def test_an_accepted_shift_is_recorded_and_said(current, capsys):
    from trainer.promote import promotion

    store, vid, model, sample = current
    found = promotion.check_shift(store, vid, model, shifted(sample, "rotation", 40.0, 1.0))
    checks = promotion.with_shift({"problems": [], "baseline_version": vid}, found, 0.01, accept=True)
    assert checks["accepted"] and checks["problems"] == [found.describe(0.01)]
    assert capsys.readouterr().out == f"--accept-data-change: training despite {found.describe(0.01)}\n"
    assert promotion.with_shift({"problems": []}, found, 1e-300, accept=False)["problems"] == []  # a stricter level


def test_a_drift_alpha_outside_0_1_is_a_one_line_error():
    run = subprocess.run([sys.executable, "jobs/retrain.py", "--store", "/nonexistent", "--drift-alpha", "0"],
                         cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr == "error: --drift-alpha must lie strictly between 0 and 1, got 0.0\n"


def test_a_version_kept_before_the_reference_skips_the_test_in_one_line(current, capsys):
    from trainer.data.shift import REFERENCE
    from trainer.promote import promotion

    store, vid, model, sample = current
    kept = f"{store.version_dir(vid)}/{REFERENCE}"
    os.rename(kept, kept + ".aside")
    try:
        assert promotion.check_shift(store, vid, model, sample) is None
    finally:
        os.rename(kept + ".aside", kept)
    assert capsys.readouterr().out == (f"the current version {vid} has no shift reference; "
                                       "not testing for a shift this cycle\n")


# ---- mnist-serve's window of answers (trainer/serve/drift.py) -------------------------------------

def test_a_serving_window_keeps_the_newest_answers_and_says_a_drift_once():
    from trainer.serve.drift import MIN_ANSWERS, Watch

    rng = np.random.default_rng(3)
    watch = Watch(softmax_like(rng, 2000), size=200, alpha=0.01)
    watch.add(softmax_like(rng, MIN_ANSWERS - 1))
    report, first = watch.check()
    assert report.drift is None and not first and report.window == MIN_ANSWERS - 1
    for _ in range(5):  # 250 moved answers in batches: the window holds the newest 200
        watch.add(softmax_like(rng, 50, shift=1.0))
    (report, first), (again, first_again) = watch.check(), watch.check()
    assert report.drift and first and report.window == 200 and report.p_value < 0.01
    assert again.drift and not first_again and again.drifting_since == report.drifting_since
    watch.add(softmax_like(rng, 200))  # a clean window: the drift is over
    report, first = watch.check()
    assert report.drift is False and report.drifting_since is None and report.p_value > 0.01


def test_a_model_without_a_reference_or_a_window_is_served_unwatched(tmp_path):
    from trainer.serve.drift import Watch, reference_beside

    assert reference_beside(str(tmp_path / "mnist.keras")) is None
    np.save(tmp_path / "shift_reference.npy", np.ones((5, 10), np.float32))
    assert reference_beside(str(tmp_path / "mnist.keras")).shape == (5, 10)
    for watch, why in ((Watch(None), "no shift reference"), (Watch(np.ones((5, 10)), size=0), "--drift-window 0")):
        watch.add(np.ones((3, 10), np.float32))
        report, first = watch.check()
        assert not report.watching and report.drift is None and why in report.note and report.window == 0


@pytest.mark.ray
def test_an_accepted_shift_trains_and_its_record_keeps_the_test(current, tmp_path):
    """The same rotated day with --accept-data-change: a real cycle trains on it (Ray, 1 worker, 1
    epoch), says why in one line, and the record keeps BBSD's result and the override."""
    import shutil

    from trainer.data.shift import REFERENCE
    from trainer.store.model_store import Store

    store, vid, _, sample = current
    copy = Store(str(tmp_path / "store"))  # this store's own history: the fixture's stays as it is
    shutil.copytree(store.root, copy.root)
    data = rotated_day(store, vid, sample, tmp_path / "rotated.npz")
    run = subprocess.run([sys.executable, "jobs/retrain.py", "--store", copy.root, "--data", data,
                          "--accept-data-change", "--epochs", "1", "--num-workers", "1", "--min-accuracy", "0.5"],
                         cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, 3), run.stdout[-3000:] + run.stderr[-3000:]  # promoted, or the gate said no
    assert f"--accept-data-change: training despite shift: {DETECTOR}: largest D " in run.stdout
    (trained,) = [r for r in copy.records() if r.version != vid and r.decision != "refused"]
    assert trained.data_checks["accepted"] and trained.data_checks["shift"]["p_value"] < 0.01
    assert trained.data_checks["problems"][0].startswith(f"shift: {DETECTOR}")
    assert trained.test_accuracy is not None and os.path.isfile(f"{copy.version_dir(trained.version)}/{REFERENCE}")


@pytest.mark.parametrize("flags, message", [
    (["--drift-window", "-1"], "--drift-window at least 0"),
    (["--drift-alpha", "1"], "--drift-alpha must lie strictly between 0 and 1, got 1.0"),
])
def test_mnist_serve_refuses_a_bad_drift_flag_in_one_line_before_ray(tmp_path, capsys, flags, message):
    from trainer.serve import app

    model = tmp_path / "mnist.keras"
    model.write_bytes(b"checked only once a replica loads it")
    assert app.main(["--model", str(model), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
