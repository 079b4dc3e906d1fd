"""The model store without Ray: pointer, prune, rollback, old stores, and the lock across real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE, add_version
from trainer.common import lock as lock_module
from trainer.common.lock import LockHeld
from trainer.promote import retrain
from trainer.promote.policy import fingerprint
from trainer.store.model_store import RUNS, Store, StoreError
from trainer.store.record import VersionRecord
from trainer.store.versions import FAILED, REFUSED, REJECTED, new_version_id, status_of

# A child that takes the lock and holds it until its stdin closes (or it is killed).
HOLD = """
import sys
from trainer.store.model_store import Store
with Store(sys.argv[1]).locked():
    print("locked", flush=True)
    sys.stdin.readline()
"""
# A child that tries the lock when told to (a barrier: "ready", then a line on stdin), so several
# race for it at once however slowly each one starts.
RACE = """
import sys, time
from trainer.common.lock import LockHeld
from trainer.store.model_store import Store
print("ready", flush=True)
sys.stdin.readline()
try:
    with Store(sys.argv[1]).locked() as owner:
        print("won", bool(owner.get("took_over")), flush=True)
        time.sleep(2)
except LockHeld:
    print("held", flush=True)
"""


def child(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(str(tmp_path / "store"))
    s.create()
    return s


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 28, hour, minute, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------- pure parts

def test_version_ids_sort_by_time_and_are_unique():
    ids = [new_version_id(at(2, m)) for m in (30, 5, 59)]
    assert sorted(ids) == [ids[1], ids[0], ids[2]]
    assert ids[1].startswith("20261128T020500Z-") and len(ids[1]) == 23
    assert len({new_version_id(at(2)) for _ in range(50)}) == 50


def test_fingerprint_ignores_where_a_run_ran_but_not_the_recipe_or_data():
    base = {"model": "mlp", "epochs": 5, "output": "/a", "run_name": "x", "address": None,
            "storage_path": "/s", "data": "/d1"}
    moved = {**base, "output": "/b", "run_name": "y", "address": "auto", "storage_path": "s3://b",
             "data": "/d2"}
    assert fingerprint(base, "h1") == fingerprint(moved, "h1")
    assert fingerprint(base, "h1") != fingerprint({**base, "epochs": 6}, "h1")
    assert fingerprint(base, "h1") != fingerprint(base, "h2")


def test_a_uri_store_is_refused_in_one_line():
    with pytest.raises(StoreError, match="must be a local or mounted directory"):
        Store("s3://bucket/store")


# ---------------------------------------------------------------------------- versions and pointer

def test_register_promote_and_list(store, capsys):
    first = add_version(store, accuracy=0.975, when=at(2))
    rejected = add_version(store, REJECTED, accuracy=0.90, data_sha256="b" * 64, when=at(3))
    second = add_version(store, accuracy=0.981, data_sha256="c" * 64, when=at(4))
    failed_id = new_version_id(at(5))
    store.register_failure(VersionRecord(failed_id, decision=FAILED, reason="TrainingError: boom",
                                         started="2026-11-28T05:00:00Z", data={"content_sha256": "d" * 64}))
    assert store.version_ids() == [first, rejected, second, failed_id]
    assert store.current_id() == second
    pointer = store.pointer()
    assert [h["version"] for h in pointer["history"]] == [first, second]
    assert [status_of(r, pointer) for r in store.records()] == [
        "promoted earlier", "rejected", "current", "failed"]
    assert os.listdir(store.version_dir(failed_id)) == ["version.json"]  # no partial model
    assert store.current_model() == store.model_path(second)

    assert retrain.main(["--store", store.root, "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["VERSION", "STATUS", "TEST"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert "current" in rows[second] and "0.9810" in rows[second] and "c" * 12 in rows[second]
    assert "promoted earlier" in rows[first] and "2026-11-28 02:00:00Z" in rows[first]
    assert "rejected" in rows[rejected] and "rejected on purpose" in rows[rejected]
    assert "failed" in rows[failed_id] and "TrainingError: boom" in rows[failed_id]


def test_prune_drops_oldest_non_current_with_their_runs_and_unused_data(store):
    ids = [add_version(store, accuracy=0.98, when=at(h)) for h in range(1, 6)]
    store.rollback(ids[0])  # the oldest is current now: it must survive
    for vid in ids:
        os.makedirs(store.path(RUNS, vid))
    for vid in ids:  # each version used its own prepared data
        os.makedirs(store.path("data", f"mnist-{vid}"))
        record = store.record(vid).to_json()
        record["data"]["path"] = store.path("data", f"mnist-{vid}")
        with open(os.path.join(store.version_dir(vid), "version.json"), "w") as f:
            json.dump(record, f)
    pruned = store.prune(keep=3)
    assert pruned == ids[1:3]
    assert store.version_ids() == [ids[0], ids[3], ids[4]] and store.current_id() == ids[0]
    assert sorted(os.listdir(store.path(RUNS))) == [ids[0], ids[3], ids[4]]
    assert sorted(os.listdir(store.path("data"))) == [f"mnist-{v}" for v in (ids[0], ids[3], ids[4])]
    assert store.prune(keep=3) == []
    assert store.prune(keep=1) == [ids[3], ids[4]] and store.version_ids() == [ids[0]]


def test_clean_staging_removes_what_a_crashed_run_left(store):
    os.makedirs(store.path("staging", "20261128T020000Z-abcdef", "partial"))
    assert store.clean_staging() == ["20261128T020000Z-abcdef"]
    assert os.listdir(store.path("staging")) == [] and store.version_ids() == []


@pytest.mark.parametrize("content, message", [
    ("{not json", "is corrupt (not JSON naming a version)"),
    ('["20261128T020000Z-abcdef"]', "is corrupt"),
    ('{"version": "20991231T000000Z-000000"}', "which is not in"),
    ('{"version": "../../etc"}', "which is not in"),
])
def test_a_corrupt_pointer_stops_everything_and_nothing_is_overwritten(store, capsys, content, message):
    good = add_version(store, when=at(2))
    with open(store.path("current.json"), "w") as f:
        f.write(content)
    before = sorted(os.listdir(store.root)), store.version_ids()
    with pytest.raises(StoreError, match=re.escape(message)) as caught:
        store.current_id()
    assert "\n" not in str(caught.value) and "--rollback VERSION --force" in str(caught.value)
    with pytest.raises(StoreError, match=re.escape(message)):
        store.prune(keep=1)
    # The retraining entry refuses before preparing data or training, and says why in one line.
    assert retrain.main(["--store", store.root, "--data", str(SAMPLE)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert retrain.main(["--store", store.root, "--list"]) == 1  # the table, then the error
    captured = capsys.readouterr()
    assert good in captured.out and message in captured.err
    assert retrain.main(["--store", store.root, "--rollback", good]) == 1  # needs --force
    capsys.readouterr()
    with open(store.path("current.json")) as f:
        assert f.read() == content
    assert (sorted(os.listdir(store.root)), store.version_ids()) == before
    # --force repairs it, keeping the broken file beside it.
    assert retrain.main(["--store", store.root, "--rollback", good, "--force"]) == 0
    assert store.current_id() == good
    broken = [n for n in os.listdir(store.root) if n.startswith("current.json.broken-")]
    with open(store.path(broken[0])) as f:
        assert f.read() == content


def test_a_missing_pointer_with_promoted_versions_is_an_error(store):
    add_version(store, when=at(2))
    os.remove(store.path("current.json"))
    with pytest.raises(StoreError, match="is missing although versions passed the gate"):
        store.current_id()


def test_a_store_that_never_promoted_has_no_current(store):
    add_version(store, REJECTED, when=at(2))
    assert store.current_id() is None


def test_rollback_refuses_failed_rejected_and_unknown_versions(store):
    good = add_version(store, when=at(2))
    bad = add_version(store, REJECTED, accuracy=0.5, when=at(3))
    failed_id = new_version_id(at(4))
    store.register_failure(VersionRecord(failed_id, decision=FAILED, reason="x"))
    with pytest.raises(StoreError, match="was rejected .*pass --force"):
        store.rollback(bad)
    with pytest.raises(StoreError, match="failed to train"):
        store.rollback(failed_id, force=True)
    with pytest.raises(StoreError, match="is not in"):
        store.rollback("20991231T000000Z-000000")
    with pytest.raises(StoreError, match="is not a version id"):
        store.rollback("../versions")
    assert store.current_id() == good
    assert store.rollback(bad, force=True) == good and store.current_id() == bad


@pytest.fixture(scope="module")
def two_models():
    """Two small real MLPs trained briefly on different halves of the sample."""
    from trainer.config import Config
    from trainer.model.network import build_model, preprocess

    with np.load(SAMPLE) as npz:
        x, y = preprocess(npz["x_train"], npz["y_train"])
        x_test = preprocess(npz["x_test"], npz["y_test"])[0]
    models = []
    for seed, rows in ((1, slice(0, 1000)), (2, slice(1000, 2000))):
        model = build_model(Config(seed=seed))
        model.fit(x[rows], y[rows], batch_size=100, epochs=1, verbose=0)
        models.append(model)
    return models, x_test


def test_rollback_moves_current_and_the_loaded_model_predicts_as_that_version_did(store, two_models):
    import keras

    (old_model, new_model), x_test = two_models
    old_predictions = old_model.predict(x_test, verbose=0)
    new_predictions = new_model.predict(x_test, verbose=0)
    assert not np.array_equal(old_predictions, new_predictions)
    old = add_version(store, model=old_model, when=at(2))
    new = add_version(store, model=new_model, when=at(3))
    assert store.current_id() == new

    assert retrain.main(["--store", store.root, "--rollback", old]) == 0
    assert store.current_id() == old
    assert [h["action"] for h in store.pointer()["history"]] == ["promote", "promote", "rollback"]
    for name in ("mnist.keras", "mnist.h5"):
        loaded = keras.saving.load_model(store.current_model(name))
        np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), old_predictions)


def test_a_version_whose_parent_was_rejected_or_rolled_back_is_still_valid(store, capsys):
    base = add_version(store, accuracy=0.975, when=at(2))
    rejected = add_version(store, REJECTED, accuracy=0.90, when=at(3), parent=base)
    child = add_version(store, accuracy=0.980, when=at(4), parent=rejected)  # --init-from store:<rejected>
    grandchild = add_version(store, accuracy=0.981, when=at(5), parent=child)
    assert retrain.main(["--store", store.root, "--rollback", base]) == 0  # past the whole line
    assert retrain.main(["--store", store.root, "--rollback", child]) == 0  # its parent was rejected
    assert store.current_id() == child
    capsys.readouterr()
    assert retrain.main(["--store", store.root, "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].index("PARENT")  # the table's columns are aligned
    parents = {line.split()[0]: line[column:].split()[0] for line in lines[1:]}
    assert parents == {base: "-", rejected: base, child: rejected, grandchild: child}


def test_retrain_refuses_flags_it_sets_itself(store, capsys):
    assert retrain.main(["--store", store.root, "--output", "elsewhere"]) == 2
    assert "--output is chosen by retrain" in capsys.readouterr().err
    assert retrain.main(["--store", store.root, "--alpha", "0"]) == 2
    assert "alpha must lie strictly between 0 and 1, got 0.0" in capsys.readouterr().err
    assert retrain.main(["--store", store.root, "--warm-start", "--init-from", "x.keras"]) == 2
    assert "--warm-start starts from the store's current version" in capsys.readouterr().err
    assert retrain.main(["--store", store.root, "--warm-start", "--warm-epochs", "0"]) == 2
    assert retrain.main(["--data", str(SAMPLE)]) == 2
    assert "--store DIR is required" in capsys.readouterr().err


def test_a_store_written_before_the_paired_gate_still_lists_and_rolls_back(store, capsys):
    """Records as the tolerance gate wrote them (no discordant counts, no profile): listed with
    dashes, rolled back to, and --tolerance is still accepted (as --margin), with a notice."""
    old_gate = {"tolerance": 0.002, "min_accuracy": 0.97, "baseline_version": None, "baseline_accuracy": None}
    first = add_version(store, accuracy=0.975, when=at(2))
    second = add_version(store, REJECTED, accuracy=0.970, when=at(3))
    third = add_version(store, accuracy=0.978, when=at(4))
    for vid, baseline in ((first, None), (second, first), (third, first)):
        record = store.record(vid).to_json()
        record["gate"] = {**old_gate, "baseline_version": baseline}
        with open(store.path("versions", vid, "version.json"), "w") as f:
            json.dump(record, f)
    capsys.readouterr()
    assert retrain.main(["--store", store.root, "--list", "--tolerance", "0.002"]) == 0
    out, err = capsys.readouterr()
    assert err == ("notice: --tolerance is deprecated; it sets --margin, which the gate now tests with a paired "
                   "test (see --help)\n")
    header, *rows = out.splitlines()
    vs = header.index("VS CURRENT")
    assert [row[vs:].split()[:2] for row in rows] == [["-", "-"]] * 3
    assert [row.split()[1] for row in rows] == ["promoted", "rejected", "current"]
    assert retrain.main(["--store", store.root, "--rollback", first]) == 0
    assert store.current_id() == first


def test_an_unreadable_current_model_stops_a_cycle_before_it_trains(store, capsys):
    current = add_version(store, accuracy=0.975, when=at(2))  # its mnist.keras is "not a model"
    assert retrain.main(["--store", store.root, "--data", str(SAMPLE), "--num-workers", "1"]) == 1
    out, err = capsys.readouterr()
    (line,) = [line for line in err.splitlines() if not line.startswith("preparing data")]
    assert line.startswith(f"error: current version {current}'s model {store.model_path(current)} is unreadable (")
    assert line.endswith("roll back to another version with --rollback")
    assert "retraining version" not in out and store.version_ids() == [current] and store.current_id() == current


def test_a_refused_version_has_no_model_to_roll_back_to(store):
    add_version(store, accuracy=0.975, when=at(2))
    refused = add_version(store, REFUSED, when=at(3))
    with pytest.raises(StoreError, match=f"version {refused} refused to train and has no model"):
        store.rollback(refused, force=True)


# ---------------------------------------------------------------------------- the lock

def test_the_lock_is_exclusive_between_processes_and_released_after(store):
    holder = child(HOLD, store.root, stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeld, match=f"another retraining run holds .* \\(pid {holder.pid} on "):
            with store.locked():
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0 and not os.path.exists(store.path("lock"))
    with store.locked() as owner:
        assert owner["pid"] == os.getpid() and "took_over" not in owner
        with open(store.path("lock")) as f:
            assert json.load(f)["token"] == owner["token"]
    assert not os.path.exists(store.path("lock"))


def test_the_lock_is_released_when_the_block_raises(store):
    with pytest.raises(RuntimeError):
        with store.locked():
            raise RuntimeError("boom")
    assert not os.path.exists(store.path("lock"))


def test_a_lock_left_by_a_killed_process_is_taken_over(store):
    holder = child(HOLD, store.root, stdin=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)  # reaped; an unreaped zombie counts as dead too (see _alive)
    with open(store.path("lock")) as f:
        assert json.load(f)["pid"] == holder.pid  # the killed run never released it
    with store.locked() as owner:
        assert owner["took_over"]["pid"] == holder.pid
    assert not os.path.exists(store.path("lock"))


@pytest.mark.parametrize("stale_first", [False, True], ids=["free", "stale"])
def test_of_four_processes_racing_for_the_lock_exactly_one_wins(store, stale_first):
    if stale_first:  # they also race to take over the same stale lock
        holder = child(HOLD, store.root, stdin=subprocess.PIPE)
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    racers = [child(RACE, store.root, stdin=subprocess.PIPE) for _ in range(4)]
    assert [r.stdout.readline().strip() for r in racers] == ["ready"] * 4
    for racer in racers:
        racer.stdin.write("go\n")
        racer.stdin.flush()
    outputs = [r.communicate(timeout=60)[0].strip() for r in racers]
    assert sorted(o.split()[0] for o in outputs) == ["held", "held", "held", "won"], outputs
    assert not os.path.exists(store.path("lock"))


def test_a_lock_from_another_host_is_held_while_its_heartbeat_is_fresh(store):
    path = store.path("lock")
    with open(path, "w") as f:
        json.dump({"pid": 1, "hostname": "elsewhere", "boot_id": "x", "started": "2026-11-28T02:00:00Z",
                   "token": "t"}, f)
    with pytest.raises(LockHeld, match="on elsewhere.*last heartbeat"):
        with store.locked():
            pass
    old = time.time() - lock_module.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    with store.locked() as owner:
        assert owner["took_over"]["hostname"] == "elsewhere"


def test_a_reused_pid_does_not_keep_a_lock_alive():
    me = lock_module._lock_record()
    assert not lock_module.is_stale(me, age=0.0)
    assert lock_module.is_stale({**me, "proc_start": me["proc_start"] + 1}, age=0.0)
    unreadable_age = lock_module.STALE_AFTER_S + 1
    assert lock_module.is_stale({}, age=unreadable_age) and not lock_module.is_stale({}, age=1.0)


def test_the_holder_keeps_its_lock_fresh_with_a_heartbeat(store, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    with store.locked():
        old = time.time() - 3600
        os.utime(store.path("lock"), (old, old))
        deadline = time.monotonic() + 10  # the heartbeat (every 0.05 s here) freshens it again
        while lock_module.read_lock(store.path("lock"))[1] > 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        _, age = lock_module.read_lock(store.path("lock"))
        assert age < 5  # another host would not take it over
