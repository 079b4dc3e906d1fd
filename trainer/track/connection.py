"""MLflow's client for this job, kept from hurting a run: where a run is tracked, MLflow imported
only when asked for (its log lines to the log file), and every error after the start one warning
line, after which this process leaves that URI alone.

MLflow is a view, never the source of truth: the outputs and the store are complete without it.
Only MLflow's client runs here (mlflow-skinny); the server and `mlflow ui` run in an environment of
their own (scripts/mlflow.sh). Nothing imports MLflow unless tracking is on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
import traceback

from trainer.common import errors, quiet
from trainer.config import Config

INSTALL = 'pip install -e ".[tracking]"'
EMBEDDED = "mlflow.db"  # --track without a URI: a SQLite store beside the outputs (or in the model store)
ARTIFACTS = "mlartifacts"  # a SQLite store's artifacts, beside it
# MLflow's HTTP client retries 7 times with exponential backoff (minutes against a server that is
# down): a view of the run is not worth that wait. And the console has the run's link once, in our
# "tracking:" line. A user's own settings win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
given_up: set[str] = set()  # URIs this process gave up on after an error




class TrackingError(errors.TrackingError):
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


@contextlib.contextmanager
def prints_to_log(verbose: bool = False):
    """MLflow's own console prints in the block (`Successfully registered model 'mnist'.`, `Created
    version '1' ...`: its eprint, to sys.stderr) go to the log file, like its log lines; --verbose
    keeps them on the console."""
    if verbose:
        yield
        return
    with open(quiet.log_file(), "a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        yield


def warn(uri: str, exc: BaseException) -> None:
    """The one warning line for `uri`, the traceback to the log file; this process is done with it."""
    with open(quiet.log_file(), "a") as f:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    if uri not in given_up:
        print(f"warning: MLflow at {uri} failed ({errors.first_line(exc, named=True, limit=160)}); carrying on "
              "without it: the outputs and the store are complete, and `mnist-retrain --sync-tracking` brings "
              "the registry up to date", file=sys.stderr, flush=True)
    given_up.add(uri)


@contextlib.contextmanager
def tolerant(uri: str):
    """Run a block of MLflow calls; an error in it becomes `warn`'s line, never the caller's."""
    try:
        yield
    except Exception as exc:  # a server down, a store locked, an MLflow bug: all the same to a run
        warn(uri, exc)


def experiment_for(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, made if new (a SQLite store's with its artifacts beside the database)."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), ARTIFACTS)
    return mlflow_client.create_experiment(name, artifact_location=location)
