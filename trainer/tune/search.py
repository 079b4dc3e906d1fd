"""The search on Ray Tune: each trial is the job's own Ray Train run (trainer.train.driver.make_trainer:
the same workers, distributed step, checkpoints and failure handling), built and fitted inside a Tune
function trainable, as Ray documents for Train V2; TuneReportCallback forwards rank 0's epoch
records, which on a trial carry its validation accuracy (trainer/data/validation.py).

    Tuner(run_trial, param_space=Space.param_space(),
          TuneConfig(metric="val_accuracy", mode="max", scheduler=ASHA on "epoch", search_alg=random | Optuna))
        -> trial: Config(base + its settings) -> make_trainer(..., validation=held-out rows) -> fit()

A trial's Train run lives at <storage>/<name>-trials/<trial id>, so a trial Tune restarts (a
restored search, resume_unfinished) continues from its own latest checkpoint; a worker killed inside
a trial costs that trial a restart from its checkpoint (--max-failures), as in the job. A trial that
fails for good is recorded as failed and the search goes on (Tune's FailureConfig(max_failures=0)).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from ray import tune

from trainer.common import errors, fs, quiet, timeline
from trainer.config import Config
from trainer.data.manifest import Manifest
from trainer.train import checkpoint, driver, failures
from trainer.train.plan import Plan
from trainer.tune import results
from trainer.tune.space import Space

METRIC, TIME_ATTR = "val_accuracy", "epoch"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what TuneReportCallback names a report's checkpoint
TRIAL_RECORD = "trial.json"  # beside a trial's Train run: its id, settings and launch time
# A trial's own actor only waits on its Train run (whose controller takes no CPU): the CPUs are its
# workers'. Tune refuses a trial of no resources, and a fraction of a CPU (0.01) left each trial's
# 1-CPU worker short of a whole CPU beside the first (two trials on 2 cores waited for ever): a
# nominal MiB of memory, which no worker asks for, is what it holds.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1 << 20}
# Read by Tune as it runs: Ctrl-C (and SIGTERM, trainer/common/errors.py) reaches the search as
# KeyboardInterrupt, not Tune's own graceful stop, which ends the running trials as if complete; and
# the classic reporter, which verbose=0 silences (the new one still drew its table).
TUNE_ENV = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0"}


class TrialFailed(errors.TrainingError):
    """A trial's Train run gave up (past --max-failures); the message is the job's one line. Raised
    in the trial's actor, it reaches the search as Tune's record of the trial's error."""


@dataclasses.dataclass(frozen=True)
class Data:
    """What every trial reads: the derived data set (trainer/data/validation.py) and where runs go."""
    path: str
    manifest: dict
    storage: str  # the trials' Train runs: <storage>/<name>-trials
    cleaner: bool  # Ray Train's placement group cleaner (needs the dashboard's state API)


def run_trial(config: dict, base: dict, data: Data) -> None:
    """One trial: the job's trainer with the searched settings, scored each epoch on the validation split."""
    import ray
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainer.train.backend import Console, quiet_start_retries

    cfg = Config.from_dict({**base, **config, "data": data.path})  # what it trains on, as its checkpoints say
    trial_id = tune.get_context().get_trial_id()
    plan = Plan(data.storage, trial_id, data.path, None, Manifest.from_json(data.manifest), False, {})
    # When Tune launched the trial (its actor's start): the start-up a trial pays is from here to the
    # first step, which its workers record (scripts/tune_compare.py, docs/performance.md).
    fs.write_json(fs.join(plan.run_dir, TRIAL_RECORD), {"trial_id": trial_id, "launched": timeline.process_start_time(),
                                                         "config": config})
    record = fs.join(plan.run_dir, failures.RECORD)
    console = Console(record, cfg.max_failures, 0, cfg.epochs, epoch_lines=False, prefix=f"trial {trial_id}: ")
    trainer = driver.make_trainer(ray, cfg, plan, cleaner=data.cleaner, callbacks=[
        TuneReportCallback(), console, *(quiet_start_retries() if not cfg.verbose else [])],
                           validation=data.path)
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise TrialFailed(failures.explain(exc, len(failures.read_records(record))).splitlines()[0]) from None


class TrialLines(tune.Callback):
    """The console on the driver: one line per trial as it ends (results.line), from what Tune knows of it then."""

    def __init__(self, budget: int):
        self.budget = budget

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(trial, error_line(_error_text(trial)))

    def _print(self, trial, error: str | None) -> None:
        last = trial.last_result or {}
        epochs = int(last.get(TIME_ATTR, 0))
        sys.stdout.write(results.line(trial.trial_id, searched(trial.config), last.get(METRIC), epochs,
                                      results.status_of(error, epochs, self.budget), self.budget, error) + "\n")
        sys.stdout.flush()


def _error_text(trial) -> str | None:
    """A trial's error as Tune wrote it when the trial failed: the trial's local error file (Tune's
    Trial.get_error reads the storage path's copy, which is synced after on_trial_error)."""
    path = trial.error_file
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    return trial.get_error()


def error_line(error) -> str:
    """A failed trial's one line: the TrialFailed message (or the exception's last line) from Tune's
    error, which wraps it in the trial actor's traceback."""
    text = str(error or "failed").strip()
    last = [line for line in text.splitlines() if line.strip()][-1] if text else "failed"
    return last.split(f"{TrialFailed.__name__}: ", 1)[-1]


def searched(config: dict) -> dict:
    return {k: config[k] for k in results.SEARCHED if k in config}


def trial_runs(uri: str, experiment: str, parent_run_id: str) -> list:
    """Ray Tune's MLflowLoggerCallback: an MLflow run per trial, each a child of the search's run, with
    the trial's settings as params, every epoch's record as metrics (val_accuracy and val_loss among
    them) and FINISHED or FAILED at its end."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False,
                                 tags={"mlflow.parentRunId": parent_run_id})]


def tuner(space: Space, base: Config, data: Data, options, storage: str, concurrency: int, restore: bool,
          callbacks: list = ()):
    """Ray Tune's Tuner for the search, new or restored from <storage>/<options.name>; `callbacks`
    (trial_runs) beside the console's lines."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.to_dict(), data=data),
                                    TRIAL_RESOURCES)
    if options.search == "optuna" and not base.verbose:  # its "[I ...] A new study created in memory" line
        import optuna

        optuna.logging.disable_default_handler()
        quiet.log_to_file("optuna")
    if restore:
        return tune.Tuner.restore(os.path.join(storage, options.name), trainable, resume_unfinished=True,
                                  resume_errored=False, param_space=space.param_space())
    if options.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        algorithm = OptunaSearch(seed=base.seed)
    else:  # a SearchAlgorithm, which caps the trials in flight itself (TuneConfig's cap is for Searchers)
        algorithm = BasicVariantGenerator(random_state=base.seed, max_concurrent=concurrency)
    scheduler = (ASHAScheduler(time_attr=TIME_ATTR, max_t=space.epochs, grace_period=options.grace_period,
                               reduction_factor=options.reduction_factor)
                 if options.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable, param_space=space.param_space(),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=algorithm,
                                    num_samples=options.trials,
                                    max_concurrent_trials=None if options.search == "random" else concurrency),
        run_config=tune.RunConfig(name=options.name, storage_path=storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[TrialLines(space.epochs), *callbacks]))


def collect(grid, budget: int, trial_runs: str) -> list[results.Trial]:
    """Every trial of a finished search: its settings and error from Tune's results, its epochs from
    its own Train run's latest checkpoint (in `trial_runs`), whose history holds every epoch's record
    however often the trial was restarted or restored (Tune's own table of a restored trial can miss
    the epochs reported just before the interruption), up to the last epoch Tune saw: a trial ASHA
    stopped may have run an epoch further before it was stopped, which the search never judged."""
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or result.config.get("trial_id") or os.path.basename(result.path))
        history, checkpoint = _history(fs.join(trial_runs, trial_id))
        if not history and result.metrics_dataframe is not None and METRIC in result.metrics_dataframe:
            frame = result.metrics_dataframe  # no checkpoint to read: what Tune saw
            history = [{TIME_ATTR: e, METRIC: a, "val_loss": v}
                       for e, a, v in zip(frame[TIME_ATTR], frame[METRIC], frame["val_loss"])]
        seen = int(metrics.get(TIME_ATTR) or 0)
        by_epoch = {int(h[TIME_ATTR]): h for h in history if METRIC in h and (not seen or h[TIME_ATTR] <= seen)}
        epochs = [by_epoch[e] for e in sorted(by_epoch)]
        error = error_line(result.error) if result.error else None
        trials.append(results.Trial(
            trial_id, searched(result.config), results.status_of(error, len(epochs), budget),
            [float(h[METRIC]) for h in epochs], [float(h["val_loss"]) for h in epochs],
            checkpoint=metrics.get(CHECKPOINT_PATH_KEY) or checkpoint, error=error))
    return sorted(trials, key=lambda t: t.trial_id)


def _history(run_dir: str) -> tuple[list[dict], str | None]:
    """(the epoch records, the checkpoint's path) of a trial's Train run's latest checkpoint; ([], None)
    where it has none."""
    from ray.train import Result

    try:
        latest = Result.from_path(run_dir).checkpoint
    except (RuntimeError, OSError, ValueError):
        return [], None
    if latest is None:
        return [], None
    with latest.as_directory() as directory:
        return checkpoint.read_meta(directory)["history"], latest.path
