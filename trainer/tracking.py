"""MLflow tracking, optional (pip install -e ".[tracking]"): a training run is one MLflow run, and a
model store's versions are one registered model whose alias `champion` follows current.json.

    driver     open_run -> each epoch, live, from Ray Train's controller (backend.EpochMetrics)
               -> finish: test metrics, artifacts, the model (an MLflow Keras model with a signature)
    retrain    sync_registry after every cycle, after --rollback, and for --sync-tracking

MLflow is a view, never the source of truth: the outputs and the store are complete without it.
Once a run has started nothing here fails it: the first error prints one warning line (the
traceback goes to the log file) and the process leaves that MLflow alone from then on; the next
cycle, or `mnist-retrain --sync-tracking`, brings the registry back in line with the store.
Only MLflow's client runs here (mlflow-skinny); the server and `mlflow ui` run in an environment of
their own (scripts/mlflow.sh). Nothing imports MLflow unless tracking is on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from trainer import errors, quiet, storage
from trainer.config import Config

INSTALL = 'pip install -e ".[tracking]"'
EMBEDDED = "mlflow.db"  # --track without a URI: a SQLite store beside the outputs (or in the model store)
ARTIFACTS = "mlartifacts"  # a SQLite store's artifacts, beside it
RUN_FILE = "mlflow_run.json"  # <storage>/<run>/: the MLflow run that rerunning the run name continues
MODEL = "model"  # the logged Keras model's name in its run: runs:/<run id>/model
CHAMPION = "champion"
REGISTERED_MODEL = "mnist"
EPOCH_METRICS = ("loss", "accuracy", "samples_per_second", "world_size", "learning_rate", "seconds")
# MLflow's HTTP client retries 7 times with exponential backoff (minutes against a server that is
# down): a view of the run is not worth that wait. And the console has the run's link once, in our
# "tracking:" line. A user's own settings win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_failed: set[str] = set()  # URIs this process gave up on after an error


class TrackingError(ValueError):
    """Tracking was asked for and MLflow is not installed (one line, naming the install command)."""


def tracking_uri(cfg: Config, home: str) -> str | None:
    """Where this run is tracked, or None: --no-tracking, else --tracking-uri, else
    $MLFLOW_TRACKING_URI, else (with --track) the embedded SQLite store in `home`."""
    if cfg.no_tracking:
        return None
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None and cfg.track:
        uri = "sqlite:///" + os.path.abspath(os.path.join(home, EMBEDDED))
    return uri


def check_installed(uri: str) -> None:
    """A TrackingError naming the install command if MLflow is not installed. Imports nothing: the
    import (over a second) happens where the run opens, on a thread of its own."""
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError(f"tracking to {uri} needs MLflow, which is not installed: {INSTALL} "
                            "(or pass --no-tracking)")


def require(uri: str, verbose: bool = False):
    """MLflow, imported and quiet (its log lines go to the log file unless --verbose), or a
    TrackingError naming the install command."""
    check_installed(uri)
    import mlflow

    _configure(verbose)
    return mlflow


@functools.cache  # once a process: the client is made for every call, and each epoch on the controller
def _configure(verbose: bool) -> None:
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not verbose:
        handler = logging.FileHandler(quiet.log_file())
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).handlers = [handler]
            logging.getLogger(name).propagate = False


def client(uri: str, verbose: bool = False):
    """An MlflowClient for `uri`; a SQLite store's folder is made first."""
    require(uri, verbose)
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    return MlflowClient(uri)


def _warn(uri: str, exc: BaseException) -> None:
    """The one warning line for `uri`, the traceback to the log file; this process is done with it."""
    with open(quiet.log_file(), "a") as f:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    if uri not in _failed:
        print(f"warning: MLflow at {uri} failed ({errors.first_line(exc, named=True, limit=160)}); carrying on "
              "without it: the outputs and the store are complete, and `mnist-retrain --sync-tracking` brings "
              "the registry up to date", file=sys.stderr, flush=True)
    _failed.add(uri)


@contextlib.contextmanager
def tolerant(uri: str):
    """Run a block of MLflow calls; an error in it becomes `_warn`'s line, never the caller's."""
    try:
        yield
    except Exception as exc:  # a server down, a store locked, an MLflow bug: all the same to a run
        _warn(uri, exc)


def _experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, made if new (a SQLite store's with its artifacts beside the database)."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), ARTIFACTS)
    return mlflow_client.create_experiment(name, artifact_location=location)


def params(config: dict) -> dict[str, str]:
    """The config as MLflow params: metrics.json's names, each value as JSON holds it (a str as is)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}


def epoch_metrics(record: dict) -> dict[str, float]:
    """The numbers of one epoch's record that MLflow plots, step = the epoch."""
    return {k: float(record[k]) for k in EPOCH_METRICS if isinstance(record.get(k), (int, float))}


def job_tags() -> dict[str, str]:
    """The Ray job's ids, on the driver after Ray is up: the submission id of `ray job submit`
    (from the job config Ray hands the entrypoint) and Ray's own job id."""
    import ray

    tags = {"ray.job_id": ray.get_runtime_context().get_job_id()}
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        metadata = {}
    if metadata.get("job_submission_id"):
        tags["ray.submission_id"] = metadata["job_submission_id"]
    return tags


@dataclass
class Run:
    """A training run's MLflow run, seen from the driver. Every method is a no-op once this process
    has given up on the URI (`_warn`)."""
    uri: str
    experiment: str
    experiment_id: str
    run_id: str
    verbose: bool = False

    def describe(self) -> dict:
        """What metrics.json (and a store version's record) keeps of the run."""
        return {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id,
                "model_uri": f"runs:/{self.run_id}/{MODEL}"}

    def set_tags(self, tags: dict) -> None:
        if self.uri not in _failed:
            with tolerant(self.uri):
                mlflow_client = client(self.uri, self.verbose)
                for key, value in tags.items():
                    mlflow_client.set_tag(self.run_id, key, str(value))

    def end(self, status: str) -> None:
        """FAILED or KILLED: the run stopped before its model (a resumed run sets it RUNNING again)."""
        if self.uri not in _failed:
            with tolerant(self.uri):
                client(self.uri, self.verbose).set_terminated(self.run_id, status)

    def finish(self, output: str, model, metrics: dict) -> None:
        """The finished run: log_outcome, the world sizes and resizes, and the model, then FINISHED."""
        if self.uri in _failed:
            return
        with tolerant(self.uri):
            mlflow_client = client(self.uri, self.verbose)
            log_outcome(mlflow_client, self.run_id, metrics, output)
            tags = {"world_sizes": ",".join(str(w) for w in metrics["world_sizes"]),
                    "restarts": str(len(metrics["restarts"]))}
            for n, resize in enumerate(metrics["resizes"], 1):
                tags[f"resize.{n}"] = describe_resize(resize)
            for key, value in tags.items():
                mlflow_client.set_tag(self.run_id, key, value)
            log_model(self.uri, self.run_id, model)  # ends the run: FINISHED


def log_outcome(mlflow_client, run_id: str, metrics: dict, folder: str) -> None:
    """A finished run's numbers and reports: each epoch of `metrics` (metrics.json's) not logged yet
    (the controller's live logging failed, or a sync after an outage), the test metrics, and the
    reports in `folder`."""
    from trainer import report

    logged = {m.step for m in mlflow_client.get_metric_history(run_id, "loss")}
    for record in metrics.get("epochs", []):
        if record["epoch"] not in logged:
            log_epoch_with(mlflow_client, run_id, record)
    last = metrics["epochs"][-1]["epoch"] if metrics.get("epochs") else 0
    for key in ("test_loss", "test_accuracy"):
        if isinstance(metrics.get(key), (int, float)):
            mlflow_client.log_metric(run_id, key, float(metrics[key]), step=last)
    for name in ("metrics.json", *report.FILES):
        if os.path.exists(os.path.join(folder, name)):
            mlflow_client.log_artifact(run_id, os.path.join(folder, name))


def describe_resize(resize: dict) -> str:
    return f"after epoch {resize['after_epoch']}: {resize['from']} -> {resize['to']} workers ({resize['reason']})"


def signature():
    """What the model takes and gives: (n, 784) float32 pixels in [0, 1] -> (n, 10) probabilities."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 784), "pixels")]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, 10))]))


def log_model(uri: str, run_id: str, model) -> None:
    """`model` as the run's MLflow Keras model (pyfunc loads it); the run then ends FINISHED. The
    requirements are this environment's TensorFlow and Keras: MLflow's own inference would load the
    model again in a subprocess (seconds)."""
    import keras
    import mlflow
    import tensorflow as tf

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.keras.log_model(model, name=MODEL, signature=signature(),
                               pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"])


def log_epoch_with(mlflow_client, run_id: str, record: dict) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, v, now, record["epoch"])
                                             for k, v in epoch_metrics(record).items()])
    if "resized_from" in record:
        mlflow_client.set_tag(run_id, f"resized_at_epoch.{record['epoch']}",
                              f"{record['resized_from']} -> {record.get('world_size')} workers")


def log_epoch(uri: str, run_id: str, record: dict) -> None:
    """One epoch's numbers, live, from Ray Train's controller. An error goes to the log file only:
    the driver fills any gap when the run finishes, and warns if MLflow is still unreachable."""
    if uri in _failed:
        return
    try:
        log_epoch_with(client(uri), run_id, record)
    except Exception as exc:
        _failed.add(uri)
        with open(quiet.log_file(), "a") as f:
            f.write(f"MLflow at {uri}: not logging epochs from here on\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)


def open_run(cfg: Config, run_dir: str, run_name: str, data_sha256: str, epochs_done: int) -> Run | None:
    """The run's MLflow run, or None when tracking is off or MLflow fails (one warning line).

    Rerunning a run name (a resume, or evaluating a finished run again) continues the MLflow run
    recorded in <run>/mlflow_run.json, if this URI still has it; otherwise a new run starts, its
    params the config and its tags where the run came from."""
    uri = tracking_uri(cfg, cfg.output)
    if uri is None or uri in _failed:
        return None
    from trainer.retrain import git_commit

    with tolerant(uri):
        mlflow_client = client(uri, cfg.verbose)
        experiment_id = _experiment_id(mlflow_client, cfg.experiment, uri)
        config, previous = params(cfg.to_dict()), _recorded_run(mlflow_client, run_dir, uri, experiment_id)
        if previous:
            run_id, logged = previous.info.run_id, previous.data.params
            changed = {k: v for k, v in config.items() if logged.get(k, v) != v}
            mlflow_client.log_batch(run_id, params=_param_list({k: v for k, v in config.items() if k not in logged}))
            resumes = int(previous.data.tags.get("resumes", "0")) + 1
            mlflow_client.set_tag(run_id, "resumes", str(resumes))
            mlflow_client.set_tag(run_id, f"resume.{resumes}", f"from epoch {epochs_done}" + (
                "; changed: " + ", ".join(f"{k} {logged[k]} -> {v}" for k, v in changed.items()) if changed else ""))
            mlflow_client.update_run(run_id, status="RUNNING")
        else:
            tags = {"run_name": run_name, "run_dir": run_dir, "data_sha256": data_sha256,
                    "num_workers": params({"n": cfg.num_workers})["n"], "git_commit": git_commit()}
            if cfg.store:
                tags["store"] = cfg.store
            run_id = mlflow_client.create_run(experiment_id, run_name=run_name,
                                              tags={k: str(v) for k, v in tags.items() if v}).info.run_id
            mlflow_client.log_batch(run_id, params=_param_list(config))
            storage.write_json(storage.join(run_dir, RUN_FILE), {"uri": uri, "run_id": run_id})
        link = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if uri.startswith("http") else uri
        print(f"tracking: MLflow run {run_id} in experiment {cfg.experiment} ({link})", flush=True)
        return Run(uri, cfg.experiment, experiment_id, run_id, cfg.verbose)
    return None


def _param_list(values: dict):
    from mlflow.entities import Param

    return [Param(k, v) for k, v in values.items()]


def _recorded_run(mlflow_client, run_dir: str, uri: str, experiment_id: str):
    """The MLflow run <run>/mlflow_run.json names, if it is this URI's and this experiment's."""
    recorded = storage.read_json(storage.join(run_dir, RUN_FILE)) or {}
    if not isinstance(recorded, dict) or recorded.get("uri") != uri:
        return None
    try:
        run = mlflow_client.get_run(recorded["run_id"])
    except Exception:  # deleted, or another store that happens to share the URI's name
        return None
    return run if run.info.experiment_id == experiment_id else None


def open_run_soon(cfg: Config, *args) -> Future:
    """open_run(cfg, *args) on a thread of its own: a Future of the Run (or None)."""
    if tracking_uri(cfg, cfg.output) is None:
        done = Future()
        done.set_result(None)
        return done
    pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-open")
    try:
        return pool.submit(open_run, cfg, *args)
    finally:
        pool.shutdown(wait=False)


@contextlib.contextmanager
def ending_on_failure(opening: Future):
    """A run that raises is marked FAILED in MLflow (KILLED on Ctrl-C or SIGTERM); the error goes on."""
    try:
        yield
    except BaseException as exc:
        run = opening.result()
        if run is not None:
            run.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def version_tags(record: dict, pointer: dict | None) -> dict[str, str]:
    """A store version's tags on its registered model version: where it came from and the gate's
    decision and numbers (as `mnist-retrain --list` shows them)."""
    from trainer.gate import summary
    from trainer.policy import status_of

    gate = record.get("gate") or {}
    versus, worst = summary(gate)
    tags = {"store_version": record["version"], "status": status_of(record, pointer),
            "decision": record.get("decision"), "reason": (record.get("reason") or "")[:500],
            "test_accuracy": record.get("test_accuracy"), "data_sha256": record.get("data", {}).get("content_sha256"),
            "parent": record.get("parent"), "git_commit": record.get("git_commit"),
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
    if uri is None or uri in _failed:
        return None
    from trainer.policy import NO_MODEL

    pointer = store.pointer()  # a store that cannot be read is the store's error, not MLflow's
    records = {r["version"]: r for r in store.records() if r.get("decision") not in NO_MODEL}
    with tolerant(uri):
        mlflow_client = client(uri, cfg.verbose)
        registered = {v.tags.get("store_version"): v for v in mlflow_client.search_model_versions(f"name = '{name}'")}
        added = []
        for vid, record in records.items():
            if vid not in registered and os.path.exists(store.model_path(vid)):
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


def _register(mlflow_client, uri: str, cfg: Config, name: str, store, record: dict):
    """A registry version for a store version: its training run's logged model where this MLflow has
    it; else the store's mnist.keras, logged into that training run if this MLflow has the run (a
    server that went down before the model was logged: the run is then FINISHED), or into a new run
    named for the version."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    tracked, run_id = record.get("tracking") or {}, None
    if tracked.get("uri") == uri:
        with contextlib.suppress(Exception):  # the run is gone, or another store has this URI now
            run_id = mlflow_client.get_run(tracked["run_id"]).info.run_id
        with contextlib.suppress(Exception):  # no model: the run did not get that far
            if run_id and mlflow.models.get_model_info(tracked["model_uri"]):
                return mlflow.register_model(tracked["model_uri"], name, tags={"store_version": record["version"]})
    import keras

    quiet.import_tensorflow(cfg.verbose)
    if run_id is None:
        run_id = mlflow_client.create_run(_experiment_id(mlflow_client, cfg.experiment, uri),
                                          run_name=record["version"], tags={"store_version": record["version"]}).info.run_id
    mlflow_client.set_tag(run_id, "model_logged_from", "the model store")
    with open(os.path.join(store.version_dir(record["version"]), "metrics.json")) as f:
        log_outcome(mlflow_client, run_id, json.load(f), store.version_dir(record["version"]))
    log_model(uri, run_id, keras.saving.load_model(store.model_path(record["version"]), compile=False))
    return mlflow.register_model(f"runs:/{run_id}/{MODEL}", name, tags={"store_version": record["version"]})


def _set_tags(mlflow_client, name: str, version, tags: dict) -> None:
    for key, value in tags.items():
        if version.tags.get(key) != value:
            mlflow_client.set_model_version_tag(name, version.version, key, value)


def load_keras(model_uri: str, tracking: str | None = None):
    """The Keras model at an MLflow URI (models:/mnist@champion, runs:/<id>/model), from
    `tracking` or $MLFLOW_TRACKING_URI; a ValueError with a one-line reason."""
    uri = tracking or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(f"{model_uri} is in an MLflow registry: give --tracking-uri or set MLFLOW_TRACKING_URI")
    mlflow = require(uri)
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.keras.load_model(model_uri)
    except Exception as exc:
        raise ValueError(f"{model_uri} at {uri}: {errors.first_line(exc, limit=200)}") from None
