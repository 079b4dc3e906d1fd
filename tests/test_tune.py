"""mnist-tune: the space and its refusals, the validation split, the results (unit); a real search on
the sample through the store's gate, and an Optuna search that loses workers (a trial restarted, a
trial failed for good) and is interrupted and resumed (Ray, marked so)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE, job_env, wait_for_epoch, worker_pid
from trainer.data import shards, validation
from trainer.data.mnist import Mnist
from trainer.tune import results, space as spaces
from trainer.tune.cli import _move_aside, main

TUNE = ROOT / "jobs" / "tune.py"
LINE = re.compile(r"^trial (\S+)  .*  val_accuracy (\S+)  (\d+)/(\d+) epochs  (finished|stopped by ASHA|failed)")


# ---------------------------------------------------------------- unit: the space and its refusals

def test_the_default_space_holds_the_tutorial_recipe():
    space = spaces.build()
    assert space.learning_rate[0] < 0.001 < space.learning_rate[1]
    assert 128 in space.batch_size and 512 in space.hidden_units and space.dropout[0] == 0
    assert space.model == ("mlp",) and space.epochs == 5


def test_a_yaml_space_is_read_and_the_flags_override_it(tmp_path):
    file = tmp_path / "space.yaml"
    file.write_text("learning_rate: [0.0005, 0.005]\nbatch_size: [128, 256]\nmodel: [mlp, cnn]\nepochs: 3\n")
    space = spaces.build(str(file), hidden_units="64,128", epochs="4")
    assert space.learning_rate == (0.0005, 0.005) and space.batch_size == (128, 256)
    assert space.model == ("mlp", "cnn") and space.hidden_units == (64, 128) and space.epochs == 4


@pytest.mark.parametrize("flags, says", [
    (["--lr-range", "0.01:0.001"], "learning_rate range 0.01:0.001 must be positive and increasing"),
    (["--lr-range", "0:0.01"], "must be positive and increasing"),
    (["--batch-sizes", ","], "batch_size: the choices are empty"),
    (["--widths", "128,abc"], "expected a comma-separated list of int values"),
    (["--dropout-range", "0.5:0.1"], "dropout range 0.5:0.1 must lie in 0..1 and not decrease"),
    (["--models", "mlp,resnet"], "unknown model 'resnet'; choose from mlp, cnn"),
    (["--max-epochs", "2", "--grace-period", "3"], "the epoch budget (2) is below ASHA's grace period (3)"),
    (["--learning-rate", "0.01"], "--learning-rate is set by the search; give --lr-range: drop it"),
    (["--num-workers", "3"], "--num-workers is set by the search; give --workers-per-trial: drop it"),
    (["--reduction-factor", "1"], "--reduction-factor must be at least 2"),
    (["--trials", "0"], "--trials must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2_before_ray(flags, says, capsys):
    assert main(["--data", str(SAMPLE), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err


def test_a_space_file_that_does_not_parse_or_names_an_unknown_setting_is_refused(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [0.001, 0.01\nbatch_size: 64\n")
    assert main(["--space", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid YAML (line 2" in err, err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("momentum: [0.9, 0.99]\n")
    assert main(["--space", str(unknown)]) == 2
    assert "unknown setting 'momentum'" in capsys.readouterr().err
    assert main(["--space", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_param_space_samples_inside_the_ranges():
    from ray.tune.search.sample import Domain

    space = spaces.build(learning_rate="0.0001:0.01", batch_size="64,128", model="mlp")
    params = space.param_space()
    assert params["model"] == "mlp"  # one choice: a constant, not a distribution
    rng = np.random.default_rng(0)
    draws = params["learning_rate"].sample(size=2000, random_state=rng)
    assert isinstance(params["learning_rate"], Domain) and 1e-4 <= min(draws) and max(draws) <= 1e-2
    assert 0.3 < np.mean(np.log10(draws) < -3) < 0.7  # log-uniform: half the draws below the middle decade
    assert set(params["batch_size"].sample(size=200, random_state=rng)) == {64, 128}


# ---------------------------------------------------------------- unit: the validation split

def _data(rows: int = 1200) -> Mnist:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (rows + 300, 28, 28), dtype=np.uint8)
    y = (np.arange(rows + 300) % 10).astype(np.uint8)
    return Mnist(x[:rows], y[:rows], x[rows:], y[rows:])


def _rows(x: np.ndarray) -> list[str]:
    return sorted(hashlib.sha1(row.tobytes()).hexdigest() for row in x)


def test_the_validation_split_is_seeded_disjoint_and_never_the_test_split():
    data = _data()
    derived, index = validation.split(data, rows=100, seed=7)
    again, same = validation.split(data, rows=100, seed=7)
    _, other = validation.split(data, rows=100, seed=8)
    assert np.array_equal(index, same) and not np.array_equal(index, other)
    assert np.array_equal(derived.x_test, again.x_test) and len(derived.y_test) == 100 and len(derived.y_train) == 1100
    # The held-out rows and the rest are exactly the training rows, each once; no test row is in either.
    assert _rows(np.concatenate([derived.x_train, derived.x_test])) == _rows(data.x_train)
    assert not set(_rows(data.x_test)) & set(_rows(np.concatenate([derived.x_train, derived.x_test])))
    with pytest.raises(validation.DataError, match="must lie between 1 and"):
        validation.held_out(1200, 1200, 0)


def test_the_derived_set_is_written_once_and_recorded(tmp_path, monkeypatch):
    source = tmp_path / "data.npz"
    data = _data()
    np.savez(source, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    holdout = validation.prepare(str(source), str(tmp_path / "cache"), rows=100, seed=3)
    manifest = shards.read_manifest(holdout.path)
    assert (manifest.rows("train"), manifest.rows("test")) == (1100, 100) == (holdout.train_rows, holdout.rows)
    index = validation.held_out(1200, 100, 3)
    assert holdout.index_sha256 == hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest()
    x_val, y_val = shards.read_parquet_split(holdout.path, validation.SPLIT)
    assert np.array_equal(x_val, data.x_train[index]) and np.array_equal(y_val, data.y_train[index])
    again = validation.prepare(str(source), str(tmp_path / "cache"), rows=100, seed=3)
    assert again == holdout  # the same folder, not written twice
    # The source as Parquet shards (the job's own, written beside it): once the derived set exists,
    # the source's rows are not read at all; its manifest names its content.
    parquet = next((tmp_path / "cache").glob("mnist-*"))
    monkeypatch.setattr(shards, "load_parquet", lambda *a, **k: pytest.fail("the source was read again"))
    assert validation.prepare(str(parquet), str(tmp_path / "cache"), rows=100, seed=3) == holdout


# ---------------------------------------------------------------- unit: the results

def _trials() -> list[results.Trial]:
    config = {"model": "mlp", "learning_rate": 0.001, "batch_size": 128, "hidden_units": 512, "dropout": 0.1}
    return [results.Trial("a_00000", config, results.FINISHED, [0.9, 0.95, 0.97], [0.3, 0.2, 0.1], "/c/0"),
            results.Trial("a_00001", {**config, "hidden_units": 128}, results.STOPPED, [0.85], [0.5], "/c/1"),
            results.Trial("a_00002", {**config, "model": "cnn"}, results.FAILED, error="rank 0's process died"),
            results.Trial("a_00003", {**config, "batch_size": 512}, results.FAILED, [0.99], [0.05], "/c/3",
                          error="rank 0's process died")]  # the best score, but it failed: never the winner


def test_the_table_ranks_by_the_last_validation_accuracy_and_counts_the_rest():
    text = results.table(_trials(), budget=3, top=5)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["RANK", "TRIAL", "VAL", ]
    assert lines[1].split()[:5] == ["1", "a_00000", "0.9700", "3/3", "finished"]
    assert lines[2].split()[:4] == ["2", "a_00001", "0.8500", "1/3"] and "stopped by ASHA" in lines[2]
    assert len(lines) == 4 and "a_00003" not in text  # a failed trial is not ranked, however well it scored
    assert lines[-1] == "4 trials: 1 finished, 1 stopped by ASHA, 2 failed"
    assert [t.trial_id for t in results.best(_trials())] == ["a_00000", "a_00001"]
    failed = results.line("a_00002", {"model": "cnn", "learning_rate": 0.001, "batch_size": 128}, None, 0,
                          results.FAILED, 3, "rank 0's process died")
    assert failed == "trial a_00002  cnn lr 1.0e-03 batch 128  val_accuracy -  0/3 epochs  failed: rank 0's process died"
    assert results.status_of(None, 2, 3) == results.STOPPED and results.status_of("x", 3, 3) == results.FAILED


def test_the_files_say_what_the_records_say(tmp_path):
    trials = _trials()
    paths = results.write(str(tmp_path), {"winner": {"trial_id": "a_00000"}}, trials)
    written = json.loads(Path(paths["results.json"]).read_text())
    assert written["schema"] == results.SCHEMA and [t["trial_id"] for t in written["trials"]] == [
        "a_00000", "a_00001", "a_00002", "a_00003"]
    assert written["trials"][0]["val_accuracy"] == [0.9, 0.95, 0.97] and written["trials"][0]["epochs"] == 3
    import csv

    rows = list(csv.DictReader(Path(paths["results.csv"]).open()))
    assert [(r["trial_id"], r["status"], r["epochs"]) for r in rows] == [
        ("a_00000", "finished", "3"), ("a_00001", "stopped by ASHA", "1"), ("a_00002", "failed", "0"),
        ("a_00003", "failed", "1")]
    assert rows[0]["val_accuracy_by_epoch"] == "0.900000;0.950000;0.970000" and rows[2]["error"]
    assert Path(paths["tuning.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_force_moves_a_search_and_its_trials_aside_and_deletes_nothing(tmp_path, capsys):
    for folder in ("mnist-tune", "mnist-tune-trials"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "kept.json").write_text("{}")
    _move_aside(str(tmp_path), "mnist-tune")
    moved = sorted(p.name for p in tmp_path.iterdir())
    assert [re.sub(r"\d{8}-\d{6}", "T", name) for name in moved] == [
        "mnist-tune-trials.replaced-T", "mnist-tune.replaced-T"]
    assert all((tmp_path / name / "kept.json").exists() for name in moved)
    assert capsys.readouterr().out.count("--force: moved ") == 2
    _move_aside(str(tmp_path), "mnist-tune")  # nothing there now: nothing moved, nothing said
    assert sorted(p.name for p in tmp_path.iterdir()) == moved and capsys.readouterr().out == ""


# ---------------------------------------------------------------- real searches on the sample

def _tune(*args: str) -> list[str]:
    return [sys.executable, str(TUNE), "--data", str(SAMPLE), "--validation-rows", "500", *args]


def _trial_lines(console: str) -> dict[str, tuple]:
    found = {}
    for text in console.splitlines():
        match = LINE.match(text)
        if match:
            found[match[1]] = (float(match[2]), int(match[3]), match[5])
    return found


@pytest.mark.ray
def test_a_search_stops_trials_early_and_its_winner_passes_the_gate_into_the_store(tmp_path):
    """4 trials, ASHA, 1 worker each; the winner retrained and promoted through the cycle; tracked in
    MLflow (the store's embedded one) as a parent run with a child run per trial."""
    out, runs, store = tmp_path / "out", tmp_path / "runs", tmp_path / "store"
    done = subprocess.run(_tune("--trials", "4", "--max-epochs", "2", "--output", str(out), "--storage-path",
                                str(runs), "--store", str(store), "--min-accuracy", "0.5", "--track"),
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = json.loads((out / "results.json").read_text())
    shown = _trial_lines(done.stdout)
    # The console's lines and the files agree, trial by trial; at least one trial was stopped early.
    assert set(shown) == {t["trial_id"] for t in written["trials"]} and len(shown) == 4, done.stdout
    for trial in written["trials"]:
        assert shown[trial["trial_id"]] == (round(trial["val_accuracy"][-1], 4), trial["epochs"], trial["status"])
    assert any(t["status"] == results.STOPPED and t["epochs"] == 1 for t in written["trials"]), done.stdout
    assert "RANK  TRIAL" in done.stdout and (out / "results.csv").exists() and (out / "tuning.png").exists()
    # The winner: the best last validation accuracy, retrained, promoted, and it scores what its record says.
    winner = written["winner"]
    assert winner["val_accuracy"] == max(t["val_accuracy"][-1] for t in written["trials"] if t["val_accuracy"])
    assert winner["store"]["decision"] == "passed" and winner["store"]["exit_code"] == 0
    current = json.loads((store / "current.json").read_text())["version"]
    record = json.loads((store / "versions" / current / "version.json").read_text())
    assert {k: record["config"][k] for k in winner["config"]} == winner["config"]
    # Its timeline counts from its own start, not the search's: its first step came before the search's length.
    timeline = json.loads((store / "versions" / current / "metrics.json").read_text())["timeline"]
    assert 0 < timeline["first_step"] < written["seconds"]["search"], (timeline, written["seconds"])
    import keras

    model = keras.models.load_model(store / "versions" / current / "mnist.keras")
    with np.load(SAMPLE) as sample:
        x, y = sample["x_test"].reshape(-1, 784).astype("float32") / 255, sample["y_test"]
    assert abs(float(np.mean(model.predict(x, verbose=0).argmax(1) == y)) - record["test_accuracy"]) < 1e-6
    # No trial saw a test image: each trained on the derived set (the training rows less the held-out
    # ones) and was scored on the held-out rows, which together are exactly the sample's training rows.
    held = written["validation"]
    assert held["rows"] == 500 and held["train_rows"] == 2500 and held["seed"] == 0
    derived = shards.load_parquet(held["path"])
    with np.load(SAMPLE) as sample:
        assert _rows(np.concatenate([derived.x_train, derived.x_test])) == _rows(sample["x_train"])
    trial_runs = sorted(p for p in (runs / "mnist-tune-trials").iterdir() if p.is_dir())
    assert len(trial_runs) == 4
    for run in trial_runs:
        last = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
        meta = json.loads((run / last["checkpoint_dir_name"] / "meta.json").read_text())
        assert meta["config"]["data"] == held["path"], meta["config"]
        assert all(h["global_rows_seen"] == 2500 for h in meta["history"])
    # MLflow: the search's run, a child per trial (its settings, every epoch's validation accuracy, its
    # status), the winner's training run linked to it and registered as the champion.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    parent = client.get_run(written["tracking"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_val_accuracy"] == winner["val_accuracy"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {t["trial_id"]: t for t in written["trials"]}
    trial_runs = {next(i for i in by_trial if i in run.info.run_name): run for run in children
                  if any(i in run.info.run_name for i in by_trial)}
    assert set(trial_runs) == set(by_trial)
    for trial_id, run in trial_runs.items():
        trial = by_trial[trial_id]
        assert run.data.tags["status"] == trial["status"] and run.info.status == "FINISHED"
        assert float(run.data.params["learning_rate"]) == pytest.approx(trial["config"]["learning_rate"])
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [round(m.value, 6) for m in sorted(history, key=lambda m: m.step)] == [
            round(v, 6) for v in trial["val_accuracy"]]
    trained = record["tracking"]["run_id"]
    assert trained in {run.info.run_id for run in children}
    assert client.get_model_version_by_alias("mnist", "champion").run_id == trained


class _Console:
    """A running search's stdout, read line by line on a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if re.search(pattern, line)]
            if found:
                return found[0]
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.1)
        raise TimeoutError(f"no line matching {pattern!r}: {''.join(self.lines)[-3000:]}")


@pytest.mark.ray
def test_a_killed_worker_costs_a_restart_a_trial_past_its_retries_fails_and_a_stopped_search_continues(tmp_path):
    """Optuna's search, one trial at a time, one retry each (--max-failures 1): the first trial loses
    its worker (SIGKILL) twice and fails for good, and the search goes on; the second loses it once
    and, as it restarts from its checkpoint, the search is stopped (SIGTERM, as `ray job stop` sends);
    the same command continues it, running the failed trial no more, and the second finishes from
    its checkpoint."""
    runs = tmp_path / "runs"
    command = _tune("--trials", "2", "--search", "optuna", "--scheduler", "fifo", "--max-epochs", "3",
                    "--max-concurrent-trials", "1", "--max-failures", "1", "--output", str(tmp_path / "out"),
                    "--storage-path", str(runs))
    proc = subprocess.Popen(command, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    console = _Console(proc)
    trials = runs / "mnist-tune-trials"

    def next_trial(seen: list) -> Path:
        while not (trials.exists() and [p for p in trials.iterdir() if p.is_dir() and p not in seen]):
            assert proc.poll() is None, "".join(console.lines)[-3000:]
            time.sleep(0.2)
        return next(p for p in trials.iterdir() if p.is_dir() and p not in seen)

    def kill_at(trial: Path, epoch: int) -> None:
        os.kill(worker_pid(wait_for_epoch(trial, epoch, proc), rank=0), signal.SIGKILL)

    try:
        first = next_trial([])
        kill_at(first, 1)
        restarted = console.wait_for(rf"^trial {first.name}: restarted after a worker failure")
        assert "rank 0's process died" in restarted and "continuing from epoch 2" in restarted
        kill_at(first, 2)
        failed = console.wait_for(rf"^trial {first.name}  .*  failed")
        assert "2/3 epochs  failed: " in failed and "rank 0's process died" in failed, failed
        second = next_trial([first])
        kill_at(second, 1)
        console.wait_for(rf"^trial {second.name}: restarted after a worker failure")
        # Stopped while its new worker group starts: two epochs stay to run, however fast the machine.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    console.thread.join(timeout=10)
    shown = "".join(console.lines)
    assert shown.rstrip().endswith("rerun the same command to continue the search (--name mnist-tune)")
    assert "[I " not in shown and "A new study created" not in shown, shown  # Optuna's chatter: in the log file
    again = subprocess.run(command, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing the search in" in again.stdout
    resumed = _trial_lines(again.stdout)
    assert list(resumed) == [second.name] and resumed[second.name][1:] == (3, "finished"), again.stdout
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    by_id = {t["trial_id"]: t for t in written["trials"]}
    assert [(by_id[t.name]["status"], by_id[t.name]["epochs"]) for t in (first, second)] == [("failed", 2), ("finished", 3)]
    assert "rank 0's process died" in by_id[first.name]["error"] and written["winner"]["trial_id"] == second.name
    last = json.loads((second / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    history = json.loads((second / last["checkpoint_dir_name"] / "meta.json").read_text())["history"]
    # Each epoch once, epoch 2 resumed from the epoch-1 checkpoint (after the restart, or after the search's
    # restore if the stop came first): never trained again from the start.
    assert [h["epoch"] for h in history] == [1, 2, 3] and [bool(h["restarted"]) for h in history][:2] == [False, True]
