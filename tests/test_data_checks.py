"""Data checks before training (trainer/data/checks.py): the committed sample (real MNIST digits),
altered the ways bad data arrives, against the profile of the unaltered sample. Then the same
refusals through jobs/retrain.py on a store whose current version holds that profile: one line, exit
status 4, a "refused" record, nothing moved. No Ray, no TensorFlow (a refusal comes before both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE, job_env
from trainer.common.clock import iso, utc_now
from trainer.data.checks import Limits, compare, overlap, profile
from trainer.data.mnist import Mnist
from trainer.data.shards import load_npz
from trainer.promote import promotion
from trainer.store.model_store import Store
from trainer.store.record import VersionRecord
from trainer.store.versions import PASSED, new_version_id

RETRAIN = ROOT / "jobs" / "retrain.py"


def altered(kind: str) -> Mnist:
    """The sample with one thing wrong, as bad data arrives."""
    m = load_npz(str(SAMPLE))
    x, y = m.x_train, m.y_train
    if kind == "digit removed":
        x, y = x[y != 3], y[y != 3]
    elif kind == "label mix shifted":  # 30% of the 0-4 rows replaced by copies of 5-9 rows: as many rows
        rng = np.random.default_rng(0)
        low, high = np.flatnonzero(y < 5), np.flatnonzero(y >= 5)
        dropped = rng.choice(low, len(low) * 3 // 10, replace=False)
        rows = np.concatenate([np.setdiff1d(np.arange(len(y)), dropped), rng.choice(high, len(dropped))])
        x, y = x[rows], y[rows]
    elif kind == "labels swapped":  # every label off by one: the same mix, each digit's ink moved
        y = (y + 1) % 10
    elif kind == "test rows in train":
        x, y = np.concatenate([x, m.x_test[:50]]), np.concatenate([y, m.y_test[:50]])
    elif kind == "inverted":
        x = 255 - x
    elif kind == "0..1 floats cast to 0..255":
        x = (x / 255.0).astype(np.uint8)
    elif kind == "rows shrank":
        x, y = x[:2000], y[:2000]
    elif kind != "unchanged":
        raise ValueError(kind)
    return Mnist(x, y, m.x_test, m.y_test)


# kind -> the checks that must name it
REFUSALS = {
    "digit removed": ["digits: digit 3 10.2% -> 0.0% of rows", "labels: the label mix moved by 0.102",
                      "rows: 3000 -> 2695 training rows"],
    "label mix shifted": ["labels: the label mix moved by 0.149"],
    "labels swapped": ["pixels: digit 0 mean intensity 0.1722 -> 0.1258, digit 1 mean intensity 0.0759 -> 0.1722"],
    "test rows in train": ["leakage: 50 test images are also in the training split"],
    "inverted": ["pixels: mean intensity 0.1305 -> 0.8695, zero pixels 80.9% -> 0.7%"],
    "0..1 floats cast to 0..255": ["pixels: mean intensity 0.1305 -> 0.0000, zero pixels 80.9% -> 99.3%"],
    "rows shrank": ["rows: 3000 -> 2000 training rows (-33.3%; the limit is -10%)"],
}


@pytest.fixture(scope="module")
def baseline() -> dict:
    return profile(altered("unchanged"))


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_each_bad_change_is_named_with_its_numbers(baseline, kind):
    problems = compare(baseline, profile(altered(kind)), Limits())
    for expected in REFUSALS[kind]:
        assert any(p.startswith(expected) for p in problems), problems
    assert len(problems) == len(REFUSALS[kind]), problems


def test_the_same_data_and_a_small_change_pass(baseline):
    assert compare(baseline, baseline, Limits()) == []
    m = load_npz(str(SAMPLE))
    fewer = profile(Mnist(m.x_train[:2800], m.y_train[:2800], m.x_test, m.y_test))  # -6.7% rows
    assert compare(baseline, fewer, Limits()) == []
    assert overlap(baseline, fewer) == pytest.approx(2800 / 3000, abs=0.06)  # the sketch's estimate
    assert overlap(baseline, profile(altered("inverted"))) == 0


def test_a_profile_is_small_and_json():
    text = json.dumps(profile(altered("unchanged")))
    assert len(text) < 8000 and json.loads(text)["labels"][1] == 341


def current_store(tmp_path) -> tuple[Store, str]:
    """A store whose current version was trained on the sample: its record holds the sample's
    profile, as a cycle writes it (model files are placeholders: a refusal never loads them)."""
    store = Store(str(tmp_path / "store"))
    store.create()
    vid = new_version_id()
    staging = store.new_staging(vid)
    for name in ("mnist.keras", "mnist.h5", "metrics.json"):
        with open(os.path.join(staging, name), "w") as f:
            f.write("{}")
    store.register(VersionRecord(vid, decision=PASSED, started=iso(utc_now()),
                                 data={"content_sha256": "a" * 64, "profile": profile(altered("unchanged"))}))
    store.promote(vid)
    return store, vid


@pytest.mark.parametrize("kind", ["digit removed", "label mix shifted", "test rows in train", "inverted"])
def test_a_cycle_refuses_bad_data_in_one_line_with_exit_4_and_a_record(tmp_path, kind):
    store, current = current_store(tmp_path)
    m = altered(kind)
    data = tmp_path / "new.npz"
    np.savez(data, x_train=m.x_train, y_train=m.y_train, x_test=m.x_test, y_test=m.y_test)
    run = subprocess.run([sys.executable, str(RETRAIN), "--store", store.root, "--data", str(data)],
                         cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 4, run.stdout + run.stderr
    (line,) = run.stdout.splitlines()
    assert line.startswith("refused ") and REFUSALS[kind][0] in line and "--accept-data-change" in line
    assert [line for line in run.stderr.splitlines() if not line.startswith("preparing data")] == []
    refused = [r for r in store.records() if r.version != current]
    assert len(refused) == 1 and refused[0].decision == "refused"
    assert refused[0].data_checks["problems"] and refused[0].reason in line
    assert store.current_id() == current and os.listdir(store.path("staging")) == []
    assert sorted(os.listdir(store.version_dir(refused[0].version))) == ["version.json"]
    listing = subprocess.run([sys.executable, str(RETRAIN), "--store", store.root, "--list"], cwd=ROOT,
                             env=job_env(), capture_output=True, text=True, timeout=60)
    row = next(r for r in listing.stdout.splitlines() if r.startswith(refused[0].version))
    assert " refused " in row and REFUSALS[kind][0] in row


def test_a_current_version_without_a_profile_is_not_checked_once(tmp_path, capsys):
    """A store from before the data checks: its current record has no profile, so the cycle trains."""
    store, current = current_store(tmp_path)
    record = store.record(current).to_json()
    del record["data"]["profile"]
    with open(store.path("versions", current, "version.json"), "w") as f:
        json.dump(record, f)
    checks = promotion.check_data(store, current, profile(altered("inverted")), accept=False)
    assert checks["problems"] == [] and checks["baseline_version"] is None
    assert f"the current version {current} has no data profile" in capsys.readouterr().out
    with_profile, _ = current_store(tmp_path / "b")
    accepted = promotion.check_data(with_profile, with_profile.current_id(), profile(altered("inverted")), accept=True)
    assert accepted["accepted"] and accepted["problems"][0].startswith("pixels:")


# ---- the same checks over shards read one at a time (a cycle at MNIST8M scale) --------------------

def sharded(tmp_path, data: Mnist, rows_per_file: int) -> str:
    from trainer.data.shards import write_parquet

    write_parquet(data, str(tmp_path / "shards"), rows_per_file=rows_per_file)
    return str(tmp_path / "shards")


def test_a_survey_of_shards_profiles_and_samples_as_the_whole_split_would(tmp_path):
    """Leaked test rows in the middle of the split, shards of 700 rows: the profile from one pass over
    the shards is the profile of the whole split, and BBSD's sample the same rows."""
    from trainer.data.shards import read_manifest
    from trainer.data.shift import SEED, sample_rows

    data = altered("test rows in train")
    path = sharded(tmp_path, data, 700)
    whole, (streamed, small) = profile(data), promotion.survey(path, read_manifest(path), None)
    pixels, expected = streamed.pop("pixels"), whole.pop("pixels")
    assert pixels.pop("digit_mean") == pytest.approx(expected.pop("digit_mean"), rel=1e-12)
    assert pixels == pytest.approx(expected, rel=1e-12)
    assert streamed == whole and whole["leaked_test_images"] == 50
    rows = sample_rows(len(data.y_train), 1000, SEED)
    with pytest.MonkeyPatch.context() as patch:  # a sample smaller than the split: the rows it names
        patch.setattr("trainer.data.shift.SAMPLE_ROWS", 1000)
        _, small = promotion.survey(path, read_manifest(path), None)
    assert np.array_equal(small.x_train, data.x_train[rows]) and np.array_equal(small.y_train, data.y_train[rows])
    assert np.array_equal(small.x_test, data.x_test)


def test_a_changed_shard_is_caught_by_the_survey(tmp_path):
    import pyarrow.parquet as pq

    from trainer.data.mnist import DataError
    from trainer.data.shards import read_manifest

    path = sharded(tmp_path, load_npz(str(SAMPLE)), 1000)
    shard = f"{path}/{read_manifest(path).files('train')[1]['path']}"
    table = pq.read_table(shard)
    labels = table.column("label").to_numpy().copy()
    labels[0] = (labels[0] + 1) % 10
    pq.write_table(table.set_column(2, "label", [labels]), shard)
    with pytest.raises(DataError, match="content hash does not match manifest.json; the shards were changed"):
        promotion.survey(path, read_manifest(path), None)


def test_a_survey_holds_one_shard_not_the_split(tmp_path):
    """4x the rows, the same shard size: the peak (BBSD's sample, a shard, the test split) grows by the
    labels alone (a byte a row)."""
    import tracemalloc

    from trainer.data.shards import read_manifest

    m = load_npz(str(SAMPLE))
    peaks = []
    for copies in (4, 16):  # 12,000 and 48,000 rows: more than the sample either way
        data = Mnist(np.concatenate([m.x_train] * copies), np.concatenate([m.y_train] * copies), m.x_test, m.y_test)
        path = sharded(tmp_path / str(copies), data, 1000)
        del data
        tracemalloc.start()
        promotion.survey(path, read_manifest(path), None)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0], peaks
