"""A training run as one MLflow run: opened while Ray starts, each epoch logged live from Ray Train's
controller (trainer/train/backend.py), and at the end the test metrics, the reports and the model
(an MLflow Keras model with a signature). Rerunning a run name continues its MLflow run. Nothing
here fails the run (trainer/track/connection.py)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from trainer.common import fs, provenance, quiet
from trainer.config import Config
from trainer.track.connection import client, experiment_for, given_up, tolerant, tracking_uri

RUN_FILE = "mlflow_run.json"  # <storage>/<run>/: the MLflow run that rerunning the run name continues
MODEL = "model"  # the logged Keras model's name in its run: runs:/<run id>/model
EPOCH_METRICS = ("loss", "accuracy", "samples_per_second", "world_size", "learning_rate", "seconds")


def params(config: dict) -> dict[str, str]:
    """The config as MLflow params: metrics.json's names, each value as JSON holds it (a str as is)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}


def epoch_metrics(record: dict) -> dict[str, float]:
    """The numbers of one epoch's record that MLflow plots, step = the epoch."""
    return {k: float(record[k]) for k in EPOCH_METRICS if isinstance(record.get(k), (int, float))}


@dataclass
class Run:
    """A training run's MLflow run, seen from the driver. Every method is a no-op once this process
    has given up on the URI (`warn`)."""
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
        if self.uri not in given_up:
            with tolerant(self.uri):
                mlflow_client = client(self.uri, self.verbose)
                for key, value in tags.items():
                    mlflow_client.set_tag(self.run_id, key, str(value))

    def end(self, status: str) -> None:
        """FAILED or KILLED: the run stopped before its model (a resumed run sets it RUNNING again)."""
        if self.uri not in given_up:
            with tolerant(self.uri):
                client(self.uri, self.verbose).set_terminated(self.run_id, status)

    def finish(self, output: str, model, metrics: dict) -> None:
        """The finished run: log_outcome, the world sizes and resizes, and the model, then FINISHED."""
        if self.uri in given_up:
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
    from trainer.model import report

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
    if uri in given_up:
        return
    try:
        log_epoch_with(client(uri), run_id, record)
    except Exception as exc:
        given_up.add(uri)
        with open(quiet.log_file(), "a") as f:
            f.write(f"MLflow at {uri}: not logging epochs from here on\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)


def open_run(cfg: Config, run_dir: str, run_name: str, data_sha256: str, epochs_done: int) -> Run | None:
    """The run's MLflow run, or None when tracking is off or MLflow fails (one warning line).

    Rerunning a run name (a resume, or evaluating a finished run again) continues the MLflow run
    recorded in <run>/mlflow_run.json, if this URI still has it; otherwise a new run starts, its
    params the config and its tags where the run came from."""
    uri = tracking_uri(cfg, cfg.output)
    if uri is None or uri in given_up:
        return None

    with tolerant(uri):
        mlflow_client = client(uri, cfg.verbose)
        experiment_id = experiment_for(mlflow_client, cfg.experiment, uri)
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
                    "num_workers": params({"n": cfg.num_workers})["n"], "git_commit": provenance.git_commit()}
            if cfg.store:
                tags["store"] = cfg.store
            run_id = mlflow_client.create_run(experiment_id, run_name=run_name,
                                              tags={k: str(v) for k, v in tags.items() if v}).info.run_id
            mlflow_client.log_batch(run_id, params=_param_list(config))
            fs.write_json(fs.join(run_dir, RUN_FILE), {"uri": uri, "run_id": run_id})
        link = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if uri.startswith("http") else uri
        print(f"tracking: MLflow run {run_id} in experiment {cfg.experiment} ({link})", flush=True)
        return Run(uri, cfg.experiment, experiment_id, run_id, cfg.verbose)
    return None


def _param_list(values: dict):
    from mlflow.entities import Param

    return [Param(k, v) for k, v in values.items()]


def _recorded_run(mlflow_client, run_dir: str, uri: str, experiment_id: str):
    """The MLflow run <run>/mlflow_run.json names, if it is this URI's and this experiment's."""
    recorded = fs.read_json(fs.join(run_dir, RUN_FILE)) or {}
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


def close_search(run: Run, metrics: dict[str, float], trial_status: dict[str, str], children: list[str]) -> None:
    """A search's parent run: its `metrics` (best validation accuracy, the winner's test accuracy, ...),
    each trial's child run (named for its trial id, Ray Tune's MLflowLoggerCallback's) tagged with its
    status ("stopped by ASHA" is FINISHED to MLflow), the `children` (the winner's run) linked to it,
    then FINISHED."""
    if run.uri in given_up:
        return
    with tolerant(run.uri):
        mlflow_client = client(run.uri, run.verbose)
        mlflow_client.log_batch(run.run_id, metrics=_metric_list(metrics))
        for child in mlflow_client.search_runs([run.experiment_id],
                                               filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'"):
            found = [t for t in trial_status if t in (child.info.run_name or "")]
            if found:
                mlflow_client.set_tag(child.info.run_id, "status", trial_status[found[0]])
        for run_id in children:
            mlflow_client.set_tag(run_id, "mlflow.parentRunId", run.run_id)
        mlflow_client.set_terminated(run.run_id, "FINISHED")


def _metric_list(values: dict[str, float]):
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]
