"""mnist-tune: search the job's hyperparameters with Ray Tune, each trial the real job, scored on a
validation split held out of the training data; then the winner, retrained on the whole training
split and scored once on the test split, written like the job's outputs (or, with --store, through
the retraining cycle's checks, paired gate and canary). `main(argv)` is the console script and jobs/tune.py.

    python jobs/tune.py --data ../shared/data/mnist
    python jobs/tune.py --data ../shared/data/mnist --trials 24 --search optuna --models mlp,cnn
    python jobs/tune.py --data ../shared/data/mnist --space space.yaml --store /srv/mnist-store

The same command continues a search that was interrupted (Ctrl-C, a stopped `ray job submit`):
Tune restores <storage>/<name>, finished trials are not run again, and unfinished ones continue
from their own checkpoints.

Why the winner is retrained, not taken from its checkpoint: its checkpoint learned from the training
split less the validation rows; retrained with the same settings and seed, it learns from all of it,
its metrics.json holds the config that produced it, and with --store the cycle that promotes every
model trains it, so the data checks, the gate and the canary see it as they see any candidate. It
costs one more run of the budget (docs/performance.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import time
from dataclasses import dataclass

from trainer.common import errors, fs
from trainer.common.cli import add_options, fail, option, options_from, run_command
from trainer.common.errors import UsageError
from trainer.config import Config
from trainer.data import shards, shift, validation
from trainer.promote import cycle, registry
from trainer.promote.policy import Policy
from trainer.store.model_store import Store
from trainer.track import connection, run as tracked_run
from trainer.train import cluster, driver
from trainer.train.plan import DATA_DIR
from trainer.tune import results, space as spaces

DESCRIPTION = ("Search the MNIST job's hyperparameters with Ray Tune (each trial the real job, scored on held-out "
               "training rows), then retrain the winner and score it once on the test split. Takes the training "
               "flags the search does not set.")
SEARCHES, SCHEDULERS = ("random", "optuna"), ("asha", "fifo")
# Set by the search (or the winner's run), so not flags of a search: the space's flags set them.
SEARCHED_FLAGS = {"model": "--models", "learning_rate": "--lr-range", "batch_size": "--batch-sizes",
                  "per_worker_batch_size": "--batch-sizes", "hidden_units": "--widths", "dropout": "--dropout-range",
                  "epochs": "--max-epochs", "num_workers": "--workers-per-trial", "run_name": "--name",
                  "init_from": None, "init_optimizer": None}


@dataclass(frozen=True)
class Options:
    trials: int = option(12, "trials to run (Tune's num_samples)")
    search: str = option("random", "how trials are chosen: random, or optuna (Ray Tune's OptunaSearch; "
                         "pip install -e \".[tune]\")", choices=SEARCHES)
    scheduler: str = option("asha", "asha stops the trials behind at each rung; fifo runs every trial its whole budget",
                            choices=SCHEDULERS)
    grace_period: int = option(1, "ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: int = option(3, "ASHA: the best 1/N of the trials at a rung go on (rungs at grace x N^k epochs)")
    space: str | None = option(None, "a YAML file of the search space (trainer/tune/space.py); the flags below "
                               "override it", metavar="FILE")
    lr_range: str | None = option(None, "learning rates, log-uniform: LOW:HIGH (default 0.0001:0.01)", metavar="LOW:HIGH")
    batch_sizes: str | None = option(None, "global batch sizes to choose from (default 64,128,256,512)", metavar="LIST")
    widths: str | None = option(None, "the MLP's hidden widths to choose from (default 128,256,512,1024)",
                                metavar="LIST")
    dropout_range: str | None = option(None, "the MLP's dropout, uniform: LOW:HIGH (default 0:0.5)", metavar="LOW:HIGH")
    models: str | None = option(None, "models to choose from: mlp, cnn or mlp,cnn (default mlp)", metavar="LIST")
    max_epochs: int | None = option(None, "every trial's epoch budget, and the winner's (default 5)")
    workers_per_trial: int = option(1, "Ray Train workers per trial (and for the winner's run)")
    max_concurrent_trials: int | None = option(
        None, "trials at once (default: as many as the cluster's CPUs, or GPUs with --use-gpu, hold)")
    validation_rows: int = option(validation.ROWS, "training rows held out to score the trials on (seeded by --seed)")
    name: str = option("mnist-tune", "the search's name in --storage-path; the same command continues it")
    top: int = option(5, "rows of the final table")
    accept_data_change: bool = option(False, "with --store: promote even if the data checks refuse the data")
    drift_alpha: float = option(shift.ALPHA, "with --store: the cycle's shift test level (mnist-retrain --drift-alpha)")
    canary_python: str | None = option(None, "with --store: the serving environment's Python for the canary",
                                       metavar="PYTHON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_options(parser, Config, title="training (each trial's, and the winner's)")
    add_options(parser, Options, title="search")
    add_options(parser, Policy, title="promotion, with --store (the paired gate against the current version)")
    parser.epilog = (f"With --store the exit status is the retraining cycle's: {cycle.EXIT_CODES}. "
                     "Interrupted, rerun the same command to continue the search.")
    return parser


@dataclass(frozen=True)
class Request:
    """A search as asked for, checked before any work."""
    base: Config  # each trial's settings but the searched ones; epochs = the budget
    options: Options
    space: spaces.Space
    policy: Policy


def request_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Request:
    for name, instead in SEARCHED_FLAGS.items():
        if getattr(args, name) != parser.get_default(name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} is set by the search" + (f"; give {instead}" if instead else "") + ": drop it")
    options, policy = options_from(Options, args), options_from(Policy, args)
    space = spaces.build(options.space, learning_rate=options.lr_range, batch_size=options.batch_sizes,
                         hidden_units=options.widths, dropout=options.dropout_range, model=options.models,
                         epochs=options.max_epochs)
    if options.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {options.trials}")
    if options.grace_period < 1:
        raise UsageError(f"--grace-period must be at least 1 epoch, got {options.grace_period}")
    if options.scheduler == "asha" and options.grace_period > space.epochs:
        raise UsageError(f"the epoch budget ({space.epochs}) is below ASHA's grace period ({options.grace_period}): "
                         "raise --max-epochs or lower --grace-period")
    if options.reduction_factor < 2:
        raise UsageError(f"--reduction-factor must be at least 2, got {options.reduction_factor}")
    if options.workers_per_trial < 1:
        raise UsageError(f"--workers-per-trial must be at least 1, got {options.workers_per_trial}")
    if options.max_concurrent_trials is not None and options.max_concurrent_trials < 1:
        raise UsageError(f"--max-concurrent-trials must be at least 1, got {options.max_concurrent_trials}")
    if options.validation_rows < 1:
        raise UsageError(f"--validation-rows must be at least 1, got {options.validation_rows}")
    if not options.name or "/" in options.name or options.name.startswith((".", "_")):
        raise UsageError(f"--name {options.name!r} must be a plain folder name (no '/', not starting with . or _)")
    if not 0 < options.drift_alpha < 1:
        raise UsageError(f"--drift-alpha must lie strictly between 0 and 1, got {options.drift_alpha}")
    if options.top < 1:
        raise UsageError(f"--top must be at least 1, got {options.top}")
    if options.search == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise UsageError('--search optuna needs Optuna, which is not installed: pip install -e ".[tune]"')
    # The base: what every trial shares; a searched value still has to be a valid one, so the space's first.
    first = {"model": space.model[0], "learning_rate": space.learning_rate[0], "batch_size": space.batch_size[0],
             "hidden_units": space.hidden_units[0], "dropout": space.dropout[0]}
    base = dataclasses.replace(options_from(Config, args), **first, epochs=space.epochs,
                               num_workers=options.workers_per_trial)
    too_big = max(space.batch_size)
    if too_big < options.workers_per_trial:
        raise UsageError(f"batch size {too_big} is smaller than --workers-per-trial {options.workers_per_trial}")
    return Request(base, options, space, policy)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        request = request_from(args, parser)
    except UsageError as exc:
        return fail(str(exc))
    return run_command(lambda: search(request), describe_os_error=fs.describe,
                       interrupted=f"interrupted; rerun the same command to continue the search (--name {args.name})")


def search(request: Request) -> int:
    """The search, the winner's run, and the files; the exit status. Three steps: prepare (the
    places, MLflow, the validation split), the trials, the winner."""
    started = time.time()
    base, options, space = request.base, request.options, request.space
    storage, store, uri, holdout, source = _prepare(request)
    with cluster.environment(base):
        parent = tracked_run.open_run(dataclasses.replace(base, tracking_uri=uri),
                                      fs.join(storage, f"{options.name}-trials"), options.name,
                                      holdout.content_sha256, 0) if uri else None
        try:
            trials, experiment = _run_search(request, storage, holdout, parent)
        except BaseException as exc:
            if parent:  # KILLED on Ctrl-C or SIGTERM: the same command continues the search and the run
                parent.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    print(results.table(trials, space.epochs, options.top), flush=True)
    summary = {"experiment": experiment, "space": space.to_json(), "options": dataclasses.asdict(options),
               "validation": holdout.to_json(), "seconds": {"search": round(time.time() - started, 1)}}
    ranked = results.best(trials)
    if not ranked:
        results.write(base.output, summary, trials)
        if parent:
            parent.end("FAILED")
        failed = sum(t.status == results.FAILED for t in trials)
        raise driver.TrainingError(f"no trial ended with a validation score ({failed} of {len(trials)} failed); the "
                                   f"trials' errors are in {os.path.join(base.output, 'results.json')}")
    winner = ranked[0]
    summary["winner"] = {"trial_id": winner.trial_id, "config": winner.config, "val_accuracy": winner.score,
                         "checkpoint": winner.checkpoint}
    results.write(base.output, summary, trials)  # the search's results stand even if the winner's run fails
    cfg = dataclasses.replace(base, **winner.config, run_name=f"{options.name}-winner", data=source or base.data)
    print(f"winner: trial {winner.trial_id} ({spaces.describe(winner.config)}), val_accuracy {winner.score:.4f}; "
          f"retraining it on all {holdout.train_rows + holdout.rows:,} training rows", flush=True)
    code, tracking = _winner(request, cfg, store, uri, summary["winner"])
    if parent:
        test = summary["winner"].get("test_accuracy")
        tracked_run.close_search(parent, {"best_val_accuracy": winner.score, "trials": len(trials),
                                          "stopped": sum(t.status == results.STOPPED for t in trials),
                                          "failed": sum(t.status == results.FAILED for t in trials),
                                          **({"winner_test_accuracy": test} if test is not None else {})},
                                 {t.trial_id: t.status for t in trials},
                                 [tracking["run_id"]] if tracking and tracking.get("run_id") else [])
        summary["tracking"] = parent.describe()
    summary["seconds"]["total"] = round(time.time() - started, 1)
    paths = results.write(base.output, summary, trials)
    print(f"search results: {paths['results.json']}, results.csv and tuning.png", flush=True)
    return code


def _prepare(request: Request):
    """Before Ray: the places it writes checked, MLflow there if asked for, the validation split
    written; (storage path, store or None, tracking URI or None, Holdout, source)."""
    base, options = request.base, request.options
    storage = base.storage_path or os.path.abspath(os.path.join(base.output, "ray_results"))
    fs.Place.check("--output", base.output)
    if fs.local(storage):
        fs.Place.check("--storage-path", storage)
    store = Store(base.store) if base.store else None
    if store:
        fs.Place.check("--store", store.root)
    uri = connection.tracking_uri(base, store.root if store else base.output)  # --track alone: the cycle's home
    if uri:  # MLflow missing: one line, before any data work
        connection.check_installed(uri)
    if base.force:
        _move_aside(storage, options.name)
    source = shards.resolve_source(base.data)
    if source and "://" not in source:
        source = os.path.abspath(source)
    holdout = validation.prepare(source, fs.join(storage, DATA_DIR), options.validation_rows, base.seed)
    print(f"validation: {holdout.rows:,} of the training rows held out (seed {holdout.seed}); the trials train on "
          f"the other {holdout.train_rows:,} and never see the test split ({holdout.path})", flush=True)
    return storage, store, uri, holdout, source


def _winner(request: Request, cfg: Config, store: Store | None, uri: str | None, record: dict):
    """The winner retrained: into --output as the job writes it, or with --store through the
    retraining cycle (and the MLflow registry after it). Fills `record`; (exit code, its MLflow run)."""
    options, started = request.options, time.time()  # the winner's timeline counts from here, not the search's start
    if not store:
        metrics = driver.run(cfg, started=started)
        record.update(test_accuracy=metrics.test_accuracy, output=os.path.abspath(cfg.output), run=metrics.run)
        return 0, metrics.tracking
    code = cycle.retrain(store, cfg, request.policy, accept_data_change=options.accept_data_change,
                         canary_python=options.canary_python, drift_alpha=options.drift_alpha, run_started=started)
    version = store.records()[-1] if store.records() else None
    if version:
        record["store"] = {"version": version.version, "decision": version.decision,
                           "test_accuracy": version.test_accuracy, "exit_code": code}
        record["test_accuracy"] = version.test_accuracy
    if uri:  # the MLflow registry follows the store, as after a retraining cycle
        registry.sync_registry(store, cfg)
    return code, version.tracking if version else None


def _run_search(request: Request, storage: str, holdout: validation.Holdout, parent=None):
    """Start or join Ray, run (or continue) the search; (the trials, the experiment's path)."""
    import ray
    from ray import tune

    from trainer.tune import search as tuning

    base, options, space = request.base, request.options, request.space
    for name, value in tuning.TUNE_ENV.items():
        os.environ.setdefault(name, value)
    cleaner = cluster.connect(ray, base, dashboard=True)
    signal.signal(signal.SIGTERM, errors.interrupt)  # `ray job stop`: Tune's state is saved as trials end
    try:
        cluster.check_fits(ray, base)  # one trial's workers
        cluster.check_storage_shared(ray, storage)
        concurrency = options.max_concurrent_trials or _concurrency(ray.cluster_resources(), base, options)
        experiment = os.path.join(storage, options.name)
        restore = tune.Tuner.can_restore(experiment)
        data = tuning.Data(holdout.path, shards.read_manifest(holdout.path).to_json(),
                           fs.join(storage, f"{options.name}-trials"), cleaner)
        what = (f"{options.search} search, " + (f"ASHA (grace {options.grace_period}, reduction "
                f"{options.reduction_factor})" if options.scheduler == "asha" else "every trial to its budget"))
        print(("continuing the search in " if restore else "search: ") + f"{experiment}: {options.trials} trials of "
              f"up to {space.epochs} epochs, {what}, {concurrency} at a time, {options.workers_per_trial} "
              f"worker{'s' if options.workers_per_trial > 1 else ''} each", flush=True)
        callbacks = tuning.trial_runs(parent.uri, base.experiment, parent.run_id) if parent else []
        grid = tuning.tuner(space, base, data, options, storage, concurrency, restore, callbacks).fit()
        if grid.num_terminated + grid.num_errors < len(grid):
            raise KeyboardInterrupt  # Tune stopped early (a signal it caught): the same as Ctrl-C here
        return tuning.collect(grid, space.epochs, data.storage), experiment
    finally:
        ray.shutdown()


def _concurrency(total: dict, cfg: Config, options: Options) -> int:
    """As many trials as the cluster's CPUs (GPUs) hold, at most the trials."""
    per_trial = options.workers_per_trial
    fit = int(total.get("GPU", 0) // per_trial) if cfg.use_gpu else int(total.get("CPU", 0) // (per_trial * cfg.cpus_per_worker))
    return max(1, min(fit, options.trials))


def _move_aside(storage: str, name: str) -> None:
    """--force: the search's experiment and its trials' runs moved aside (never deleted), on local
    disk or a remote storage path."""
    for folder in (name, f"{name}-trials"):
        path = fs.join(storage, folder)
        aside = fs.move_aside(path)
        if aside:
            print(f"--force: moved {path} to {aside}", flush=True)
