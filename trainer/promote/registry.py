"""The MLflow registry that follows the model store: every version with a model registered once,
tagged with its status and the gate's decision, and the alias `champion` on current.json's version.
Runs after every mnist-retrain cycle, after --rollback, and for --sync-tracking."""

from __future__ import annotations

import contextlib
import os

from trainer.common import fs, quiet
from trainer.config import Config
from trainer.store.record import VersionRecord
from trainer.store.versions import NO_MODEL, status_of
from trainer.track.connection import client, experiment_for, given_up, prints_to_log, tolerant, tracking_uri
from trainer.track.run import MODEL, log_model, log_outcome

CHAMPION = "champion"
REGISTERED_MODEL = "mnist"


def version_tags(record: VersionRecord, pointer: dict | None) -> dict[str, str]:
    """A store version's tags on its registered model version: where it came from and the gate's
    decision and numbers (as `mnist-retrain --list` shows them)."""

    from trainer.promote.gate import summary  # scipy: only when tracking is on

    gate = record.gate or {}
    versus, worst = summary(gate)
    tags = {"store_version": record.version, "status": status_of(record, pointer),
            "decision": record.decision, "reason": (record.reason or "")[:500],
            "test_accuracy": record.test_accuracy, "data_sha256": record.data.get("content_sha256"),
            "parent": record.parent, "git_commit": record.git_commit,
            "gate.baseline_version": gate.get("baseline_version"), "gate.baseline_accuracy": gate.get("baseline_accuracy"),
            "gate.vs_current": versus, "gate.worst_digit": worst}
    return {k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in tags.items() if v not in (None, "", "-")}


def sync_registry(store, cfg: Config, name: str = REGISTERED_MODEL) -> dict | None:
    """Bring the registered model `name` in line with the store: every version that has a model is
    registered (from its training run's logged model where this MLflow has it, else from the
    store's file, in a run of its own), its tags say its status and decision, versions pruned from the
    store say so, and `champion` names current.json's version (no alias without one). Returns
    {store version: registry version} and the champion, or None when tracking is off or MLflow fails."""
    uri = tracking_uri(cfg, store.root)
    if uri is None or uri in given_up:
        return None

    pointer = store.pointer()  # a store that cannot be read is the store's error, not MLflow's
    records = {r.version: r for r in store.records() if r.decision not in NO_MODEL}
    with tolerant(uri):
        mlflow_client = client(uri, cfg.verbose)
        registered = {v.tags.get("store_version"): v for v in mlflow_client.search_model_versions(f"name = '{name}'")}
        added = []
        for vid, record in records.items():
            if vid not in registered and os.path.exists(store.model_path(vid)):
                with prints_to_log(cfg.verbose):
                    registered[vid] = _register(mlflow_client, uri, cfg, name, store, record)
                added.append(vid)
            if vid in registered:
                _set_tags(mlflow_client, name, registered[vid], version_tags(record, pointer))
        for vid, version in registered.items():
            if vid not in records and vid is not None:
                _set_tags(mlflow_client, name, version, {"status": "pruned from the store"})
        champion = pointer and registered.get(pointer["version"])
        if champion:
            mlflow_client.set_registered_model_alias(name, CHAMPION, champion.version)
        elif registered:
            with contextlib.suppress(Exception):  # no alias to delete
                mlflow_client.delete_registered_model_alias(name, CHAMPION)
        print(f"MLflow registry: {name} has {len(records)} store version(s)" + (f", {len(added)} added now" if added else "")
              + (f"; {CHAMPION} is version {champion.version} ({pointer['version']})" if champion else f"; no {CHAMPION}"),
              flush=True)
        return {"versions": {vid: v.version for vid, v in registered.items() if vid},
                "champion": champion.version if champion else None}
    return None


def _register(mlflow_client, uri: str, cfg: Config, name: str, store, record: VersionRecord):
    """A registry version for a store version: its training run's logged model where this MLflow has
    it; else the store's mnist.keras, logged into that training run if this MLflow has the run (a
    server that went down before the model was logged: the run is then FINISHED), or into a new run
    named for the version."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    tracked, run_id = record.tracking or {}, None
    if tracked.get("uri") == uri:
        with contextlib.suppress(Exception):  # the run is gone, or another store has this URI now
            run_id = mlflow_client.get_run(tracked["run_id"]).info.run_id
        with contextlib.suppress(Exception):  # no model: the run did not get that far
            if run_id and mlflow.models.get_model_info(tracked["model_uri"]):
                return mlflow.register_model(tracked["model_uri"], name, tags={"store_version": record.version})
    import keras

    quiet.import_tensorflow(cfg.verbose)
    if run_id is None:
        run_id = mlflow_client.create_run(experiment_for(mlflow_client, cfg.experiment, uri),
                                          run_name=record.version, tags={"store_version": record.version}).info.run_id
    mlflow_client.set_tag(run_id, "model_logged_from", "the model store")
    metrics = fs.read_json(os.path.join(store.version_dir(record.version), "metrics.json"), default={})
    log_outcome(mlflow_client, run_id, metrics, store.version_dir(record.version))  # what it has: metrics.json as is
    log_model(uri, run_id, keras.saving.load_model(store.model_path(record.version), compile=False))
    return mlflow.register_model(f"runs:/{run_id}/{MODEL}", name, tags={"store_version": record.version})


def _set_tags(mlflow_client, name: str, version, tags: dict) -> None:
    for key, value in tags.items():
        if version.tags.get(key) != value:
            mlflow_client.set_model_version_tag(name, version.version, key, value)
