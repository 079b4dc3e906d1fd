"""MLflow tracking (trainer/track/, trainer/promote/registry.py), against real MLflow stores and a real `mlflow server`.

Unit (no Ray): where a run is tracked, the flags it refuses, the job without MLflow installed, and
the registry's sync with a model store (real Keras models, an embedded SQLite store).
Ray (marked per test): the embedded default read back from conftest's `extras_run`; a resumed run
continuing its MLflow run; and retraining against `mlflow server` on 127.0.0.1, which is stopped in
the middle of a cycle, started again, synced, and followed through two rollbacks and mnist-predict.
The submitted 2-worker job polled live is in tests/test_submit.py (it needs that module's cluster).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE, MlflowServer, add_version, job_env, run_job
from trainer.config import Config
from trainer.promote.registry import sync_registry
from trainer.store.model_store import Store
from trainer.store.versions import PASSED, REJECTED
from trainer.track import connection, run as tracked_run
from trainer.track.models import load_keras

RETRAIN = ROOT / "jobs" / "retrain.py"
WITHOUT_MLFLOW = ("import sys; sys.modules['mlflow'] = None; from trainer.{} import main; "
                  "sys.exit(main(sys.argv[1:]))")  # `import mlflow` then fails, as where it is not installed


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def only_run(mlflow_client, experiment: str = "mnist"):
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name(experiment).experiment_id])
    return run


def history(mlflow_client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(mlflow_client.get_metric_history(run_id, key), key=lambda m: m.step)]


def registry(mlflow_client, name: str = "mnist") -> dict:
    """{store version: (registry version, tags)} and the champion's store version."""
    versions = {v.tags["store_version"]: (v.version, v.tags) for v in mlflow_client.search_model_versions(f"name = '{name}'")}
    champion = mlflow_client.get_model_version_by_alias(name, "champion").tags["store_version"]
    return versions, champion


# ---- unit ---------------------------------------------------------------------------------------

def test_tracking_is_on_with_a_uri_the_environment_or_track_and_off_with_no_tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert connection.tracking_uri(Config(), "out") is None
    assert connection.tracking_uri(Config(track=True), str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert connection.tracking_uri(Config(tracking_uri="http://127.0.0.1:5000"), "out") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert connection.tracking_uri(Config(), "out") == "http://127.0.0.1:5001"
    assert connection.tracking_uri(Config(track=True), "out") == "http://127.0.0.1:5001"
    assert connection.tracking_uri(Config(tracking_uri="http://127.0.0.1:5000"), "out") == "http://127.0.0.1:5000"
    assert connection.tracking_uri(Config(no_tracking=True), "out") is None


@pytest.mark.parametrize("settings, message", [
    ({"tracking_uri": "https://alice:s3cret@mlflow.example.com"}, "must not hold a password"),
    ({"tracking_uri": " "}, "tracking_uri must be a URI"),
    ({"track": True, "no_tracking": True}, "--no-tracking turns tracking off"),
    ({"tracking_uri": "http://127.0.0.1:5000", "no_tracking": True}, "--no-tracking turns tracking off"),
    ({"experiment": ""}, "experiment must name"),
])
def test_tracking_flags_that_cannot_work_are_refused_in_one_sentence(settings, message):
    with pytest.raises(ValueError, match=message):
        Config(**settings)


def test_params_are_the_config_as_metrics_json_holds_it_and_epochs_give_their_numbers():
    cfg = Config(num_workers=(1, 3), batch_size=128)
    params = tracked_run.params(cfg.to_dict())
    assert set(params) == set(cfg.to_dict()) and all(isinstance(v, str) for v in params.values())
    assert params["num_workers"] == "[1, 3]" and params["model"] == "mlp" and params["data"] == "null"
    assert params["augment"] == "false" and params["learning_rate"] == "0.001"
    record = {"epoch": 3, "loss": 0.2, "accuracy": 0.9, "samples_per_second": 1e4, "world_size": 2,
              "learning_rate": 0.001, "seconds": 3.1, "first_step_unix": 1.8e9, "restarted": False}
    assert tracked_run.epoch_metrics(record) == {"loss": 0.2, "accuracy": 0.9, "samples_per_second": 1e4,
                                              "world_size": 2.0, "learning_rate": 0.001, "seconds": 3.1}


def test_without_mlflow_the_job_runs_and_asking_for_tracking_is_one_line_naming_the_install(tmp_path):
    missing = str(tmp_path / "no-such-data")

    def run(module: str, *args: str, env: dict | None = None):
        return subprocess.run([sys.executable, "-c", WITHOUT_MLFLOW.format(module), *args], cwd=ROOT,
                              env=job_env(**(env or {})), capture_output=True, text=True, timeout=120)

    untracked = run("train.cli", "--data", missing, "--output", str(tmp_path / "out"))
    assert untracked.returncode == 1 and "needs MLflow" not in untracked.stderr  # on to the data, which is missing
    assert "no-such-data" in untracked.stderr
    out = ("--output", str(tmp_path / "out"))
    for module, args, env in (("train.cli", ["--track", *out], None), ("train.cli", [*out], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
                              ("promote.retrain", ["--store", str(tmp_path / "store"), "--track"], None)):
        proc = run(module, "--data", missing, *args, env=env)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "needs MLflow, which is not installed: pip install -e \".[tracking]\"" in lines[0], lines
    silenced = run("train.cli", "--data", missing, "--no-tracking", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert "needs MLflow" not in silenced.stderr and "no-such-data" in silenced.stderr
    predicted = run("serve.predict", "models:/mnist@champion", str(tmp_path / "x.png"), "--tracking-uri", "http://127.0.0.1:9")
    assert predicted.returncode == 2 and "needs MLflow" in predicted.stderr and len(predicted.stderr.splitlines()) == 1


def test_the_server_script_installs_the_same_mlflow_release_as_the_client_extra():
    import tomllib

    script = (ROOT / "scripts" / "mlflow.sh").read_text()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tracking"]
    (client_pin,) = [d for d in extra if d.startswith("mlflow-skinny==")]
    assert f'MLFLOW="mlflow=={client_pin.split("==")[1]}"' in script


def test_the_registry_follows_the_store_versions_statuses_and_champion(tmp_path, capfd):
    """sync_registry against an embedded store, with real Keras models in a real Store: every version
    with a model registered once, tagged with its decision and status, `champion` on current.json's
    version through a rollback, and the champion loadable by URI. The console gets our one line,
    not MLflow's own prints ("Successfully registered model ...")."""
    import keras

    from trainer.model.network import build_model

    store = Store(str(tmp_path / "store"))
    store.create()
    models = [build_model(Config(seed=seed)) for seed in (1, 2)]
    first = add_version(store, PASSED, 0.91, model=models[0])
    second = add_version(store, REJECTED, 0.42, model=models[1], parent=first)
    add_version(store, "failed")  # no model: nothing to register
    cfg = Config(track=True)
    capfd.readouterr()
    synced = sync_registry(store, cfg)
    console = capfd.readouterr()
    lines = [line for line in console.out.splitlines() if "MLflow" in line or "model" in line]
    assert len(lines) == 1 and re.fullmatch(rf"MLflow registry: mnist has 2 store version\(s\), 2 added now; "
                                            rf"champion is version \d \({first}\)", lines[0]), console.out
    assert "registered model" not in console.err and "Created version" not in console.err, console.err
    mlflow_client = client(connection.tracking_uri(cfg, store.root))
    versions, champion = registry(mlflow_client)
    assert set(versions) == {first, second} and champion == first
    assert synced == {"versions": {first: versions[first][0], second: versions[second][0]}, "champion": versions[first][0]}
    assert versions[first][1]["status"] == "current" and versions[first][1]["decision"] == PASSED
    assert versions[second][1]["status"] == REJECTED and versions[second][1]["reason"] == "rejected on purpose"
    assert versions[second][1]["parent"] == first and versions[second][1]["test_accuracy"] == "0.4200"
    assert versions[first][1]["data_sha256"] == "a" * 64

    with store.locked():
        store.rollback(second, force=True)
    sync_registry(store, cfg)
    again, champion = registry(mlflow_client)
    assert champion == second and {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in versions.items()}
    assert again[first][1]["status"] == "promoted earlier" and again[second][1]["status"] == "current"

    import mlflow

    mlflow.set_tracking_uri(connection.tracking_uri(cfg, store.root))
    pixels = np.random.default_rng(0).random((8, 784), dtype=np.float32)
    served = mlflow.pyfunc.load_model("models:/mnist@champion").predict(pixels)
    assert np.allclose(served, models[1].predict(pixels, verbose=0), atol=1e-6)
    assert isinstance(load_keras("models:/mnist@champion", mlflow.get_tracking_uri()), keras.Model)


# ---- Ray: the embedded default, a resume ----------------------------------------------------------

@pytest.mark.ray
def test_the_embedded_default_has_the_params_each_epoch_the_artifacts_and_a_model_pyfunc_serves(extras_run):
    import keras
    import mlflow

    from trainer.model.network import preprocess

    output, _, console = extras_run
    metrics = json.loads((output / "metrics.json").read_text())
    uri = f"sqlite:///{output}/mlflow.db"
    mlflow_client = client(uri)
    run = only_run(mlflow_client)
    assert metrics["tracking"]["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert f"tracking: MLflow run {run.info.run_id} in experiment mnist" in console
    assert run.data.params == tracked_run.params(metrics["config"])
    epochs = metrics["epochs"]
    for key in tracked_run.EPOCH_METRICS:
        logged = history(mlflow_client, run.info.run_id, key)
        assert [step for step, _ in logged] == [e["epoch"] for e in epochs], key
        assert [value for _, value in logged] == pytest.approx([e[key] for e in epochs]), key
    assert history(mlflow_client, run.info.run_id, "test_accuracy") == [(len(epochs), pytest.approx(metrics["test_accuracy"]))]
    tags = run.data.tags
    assert tags["data_sha256"] == metrics["data"]["content_sha256"] and tags["run_name"] == metrics["run"]["name"]
    assert tags["num_workers"] == "2" and tags["world_sizes"] == "2,2" and tags["restarts"] == "0"
    assert re.fullmatch(r"[0-9a-f]+", tags["ray.job_id"]) and re.match(r"[0-9a-f]{40}", tags["git_commit"])
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "evaluation.json", "training_curves.png", "confusion_matrix.png",
            "misclassified.png"} <= artifacts
    logged = json.loads(open(mlflow_client.download_artifacts(run.info.run_id, "metrics.json", str(output.parent))).read())
    assert logged["test_accuracy"] == metrics["test_accuracy"]

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(metrics["tracking"]["model_uri"])
    assert [tuple(s.shape) for s in served.metadata.get_input_schema().inputs] == [(-1, 784)]
    with np.load(SAMPLE) as npz:
        pixels, _ = preprocess(npz["x_test"][:200], npz["y_test"][:200])
    saved = keras.saving.load_model(str(output / "mnist.keras"), compile=False)
    assert np.allclose(served.predict(pixels), saved.predict(pixels, verbose=0), atol=1e-5)


@pytest.mark.ray
def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    common = ("--data", str(SAMPLE), "--num-workers", "1", "--track", "--output", str(tmp_path / "out"),
              "--run-name", "again")
    first = run_job(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_job(*common, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    mlflow_client = client(f"sqlite:///{tmp_path / 'out'}/mlflow.db")
    run = only_run(mlflow_client)  # one run: the rerun continued it
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "1"  # as first logged
    assert [step for step, _ in history(mlflow_client, run.info.run_id, "loss")] == [1, 2]
    assert run.data.tags["resumes"] == "1"
    assert run.data.tags["resume.1"] == "from epoch 1; changed: epochs 1 -> 2"
    assert [step for step, _ in history(mlflow_client, run.info.run_id, "test_accuracy")] == [1, 2]


# ---- Ray: retraining against a real tracking server ------------------------------------------------

def retrain(store, uri: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RETRAIN), "--store", str(store), "--tracking-uri", uri, *args],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def registry_night(tmp_path_factory):
    """Two cycles against `mlflow server`: the first promoted, the second rejected by the floor with
    the server stopped while it trains; the server back, --sync-tracking, then two rollbacks."""
    tmp = tmp_path_factory.mktemp("registry")
    store, steps = tmp / "store", {}
    with np.load(SAMPLE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    changed = tmp / "changed.npz"
    np.savez(changed, **{**arrays, "x_train": arrays["x_train"][:2800], "y_train": arrays["y_train"][:2800]})
    server = MlflowServer(tmp).start()
    try:
        cycle = ("--epochs", "1", "--num-workers", "1")
        steps["promoted"] = retrain(store, server.uri, "--data", str(SAMPLE), *cycle, "--min-accuracy", "0.5")
        steps["v1"] = sorted(os.listdir(store / "versions"))
        steps["after_promotion"] = registry(client(server.uri))
        proc = subprocess.Popen([sys.executable, str(RETRAIN), "--store", str(store), "--tracking-uri", server.uri,
                                 "--data", str(changed), *cycle, "--min-accuracy", "0.99"],
                                cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stdout:  # the cycle's run is in MLflow: stop the server under it
            seen.append(line)
            if line.startswith("tracking: MLflow run"):
                server.stop()
                break
        out, err = proc.communicate(timeout=600)
        steps["rejected"] = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err)
        steps["while_down"] = time.time()
        server.start()
        steps["after_outage"] = registry(client(server.uri))
        steps["sync"] = retrain(store, server.uri, "--sync-tracking", timeout=300)
        steps["after_sync"] = registry(client(server.uri))
        steps["v2"] = sorted(set(os.listdir(store / "versions")) - set(steps["v1"]))
        steps["rollback_forced"] = retrain(store, server.uri, "--rollback", steps["v2"][0], "--force", timeout=300)
        steps["after_forced"] = registry(client(server.uri))
        steps["rollback"] = retrain(store, server.uri, "--rollback", steps["v1"][0], timeout=300)
        steps["after_rollback"] = registry(client(server.uri))
        digit = tmp / "seven.png"
        from PIL import Image

        seven = arrays["x_test"][np.flatnonzero(arrays["y_test"] == 7)[0]]
        Image.fromarray(255 - seven).save(digit)  # dark ink on light paper, as people write
        steps["predict_champion"] = subprocess.run(
            [sys.executable, "-m", "trainer.serve.predict", "models:/mnist@champion", str(digit), "--json",
             "--tracking-uri", server.uri], cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=180)
        steps["predict_file"] = subprocess.run(
            [sys.executable, "-m", "trainer.serve.predict", str(store / "versions" / steps["v1"][0] / "mnist.keras"),
             str(digit), "--json"], cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=180)
        yield store, server, steps
    finally:
        server.stop()


@pytest.mark.ray
def test_a_promoted_cycle_registers_its_trained_model_as_champion_with_the_gates_tags(registry_night):
    store, server, steps = registry_night
    assert steps["promoted"].returncode == 0, steps["promoted"].stderr[-3000:]
    (v1,) = steps["v1"]
    versions, champion = steps["after_promotion"]
    assert champion == v1 and list(versions) == [v1]
    number, tags = versions[v1]
    record = json.loads((store / "versions" / v1 / "version.json").read_text())
    assert tags["decision"] == "passed" and tags["status"] == "current"
    assert tags["data_sha256"] == record["data"]["content_sha256"] and tags["test_accuracy"] == f"{record['test_accuracy']:.4f}"
    assert tags["reason"] == record["reason"]
    mlflow_client = client(server.uri)
    version = mlflow_client.get_model_version("mnist", number)
    assert version.run_id == record["tracking"]["run_id"]  # the cycle's own training run, not a copy
    run = mlflow_client.get_run(version.run_id)
    assert run.info.run_name == v1 and run.data.tags["store"] == str(store) and run.info.status == "FINISHED"
    assert "MLflow registry: mnist has 1 store version(s), 1 added now; champion is version 1" in steps["promoted"].stdout


@pytest.mark.ray
def test_a_cycle_whose_server_goes_down_completes_with_one_warning_and_the_sync_registers_it_rejected(registry_night):
    store, server, steps = registry_night
    rejected = steps["rejected"]
    assert rejected.returncode == 3, rejected.stdout[-3000:] + rejected.stderr[-3000:]
    warnings = [line for line in (rejected.stdout + rejected.stderr).splitlines() if "MLflow" in line and "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: MLflow at {server.uri} failed"), warnings
    assert "Traceback" not in rejected.stderr
    (v2,) = steps["v2"]
    assert json.loads((store / "versions" / v2 / "version.json").read_text())["decision"] == "rejected"
    assert v2 not in steps["after_outage"][0]  # the registry missed it...
    assert steps["sync"].returncode == 0, steps["sync"].stderr[-3000:]
    versions, champion = steps["after_sync"]  # ...until --sync-tracking
    assert set(versions) == {steps["v1"][0], v2} and champion == steps["v1"][0]
    assert versions[v2][1]["decision"] == "rejected" and versions[v2][1]["status"] == "rejected"
    assert "--min-accuracy" in versions[v2][1]["reason"]
    record = json.loads((store / "versions" / v2 / "version.json").read_text())
    run = client(server.uri).get_run(client(server.uri).get_model_version("mnist", versions[v2][0]).run_id)
    assert run.info.run_id == record["tracking"]["run_id"] and run.info.status == "FINISHED"  # its own run,
    assert run.data.tags["model_logged_from"] == "the model store"  # which the server missed the end of,
    mlflow_client = client(server.uri)  # completed from the store's files: the epochs, the test metrics, the reports
    assert [step for step, _ in history(mlflow_client, run.info.run_id, "loss")] == [1]
    assert run.data.metrics["test_accuracy"] == pytest.approx(record["test_accuracy"]) and "test_loss" in run.data.metrics
    assert {"metrics.json", "evaluation.json"} <= {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}


@pytest.mark.ray
def test_rollback_moves_the_champion_alias_and_predict_serves_it_by_uri(registry_night):
    _, _, steps = registry_night
    (v1,), (v2,) = steps["v1"], steps["v2"]
    for step in ("rollback_forced", "rollback"):
        assert steps[step].returncode == 0, steps[step].stderr[-3000:]
    assert steps["after_forced"][1] == v2 and steps["after_forced"][0][v2][1]["status"] == "current"
    assert steps["after_rollback"][1] == v1 and steps["after_rollback"][0][v2][1]["status"] == "rejected"
    champion, from_file = (steps[k] for k in ("predict_champion", "predict_file"))
    assert champion.returncode == 0, champion.stderr[-3000:]
    assert json.loads(champion.stdout)[0]["top3"] == json.loads(from_file.stdout)[0]["top3"]
