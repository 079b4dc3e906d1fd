"""Scheduled retraining: one cycle against a model store, or --list / --rollback. `main(argv)` is
the `mnist-retrain` console script and jobs/retrain.py.

    python jobs/retrain.py --store /srv/mnist-store --data ../shared/data/mnist
    python jobs/retrain.py --store /srv/mnist-store --data ../shared/data/mnist --warm-start
    python jobs/retrain.py --store /srv/mnist-store --list
    python jobs/retrain.py --store /srv/mnist-store --rollback 20261128T020000Z-1a2b3c
    python jobs/retrain.py --store /srv/mnist-store --tracking-uri http://127.0.0.1:5000 --sync-tracking

A cycle: lock the store -> prepare the data (Parquet shards + content hash) -> stop if neither the
data nor the training config changed since the current version -> check the data against the
current version's profile (trainer/data/checks.py) and, through the current model's eyes, against
its shift reference (trainer/data/shift.py; refuse to train on a bad change) -> train and
evaluate with trainer.train.driver.run into staging/<id> -> score both models on this data's test split
-> the paired gate (trainer/promote/gate.py) -> the canary (trainer/promote/canary.py) -> register versions/<id>
(with the decision and its numbers) -> move current.json if promoted -> prune -> unlock. With
tracking on (--track, --tracking-uri, $MLFLOW_TRACKING_URI), the MLflow registry then follows the
store (trainer/promote/registry.py), as it does after --rollback and on --sync-tracking.
With --warm-start a cycle starts from the current version's weights (its `parent`, in version.json
and --list) and trains --warm-epochs; the checks are the same.

Exit status (EXIT_CODES): 0 promoted, nothing changed, or another run holds the store (a schedule
that fires while the last run still trains is not an error); 1 an error (current.json untouched; a
run that fails once training has started keeps a "failed" record, an error before it keeps none);
2 bad flags; 3 trained but rejected by the gate; 4 refused to train on
the data; 5 passed the gate but failed the canary. Every code above 2 keeps a record (--list).
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass

from trainer.common import errors, fs
from trainer.common.cli import add_options, bug, fail, option, options_from
from trainer.common.errors import UsageError
from trainer.common.lock import LockHeld
from trainer.config import Config
from trainer.data import shift
from trainer.promote import registry
from trainer.promote.cycle import DATA_HASH_CHARS, EXIT_CODES, retrain
from trainer.promote.policy import Policy
from trainer.store.model_store import Store, StoreError
from trainer.store.record import VersionRecord
from trainer.store.versions import NO_MODEL, REJECTED, status_of
from trainer.track import connection

DESCRIPTION = ("Retrain the MNIST model into a versioned model store; promote it only if it is "
               "not significantly worse than the current one. Takes every training flag too.")
WARM_EPOCHS = 1  # reaches a 5-epoch cold run's test accuracy on full MNIST (scripts/warm_vs_cold.py)


@dataclass(frozen=True)
class Options:
    """mnist-retrain's own flags, beside every training flag (Config) and the policy's (Policy).
    The training flags' --force (retrain a finished run) doubles as retrain's."""
    warm_start: bool = option(False, "start each cycle from the current version's weights (--init-from "
                              "store:current) and train --warm-epochs; with no current version yet, train "
                              "from scratch for --epochs")
    warm_epochs: int = option(WARM_EPOCHS, "epochs of a --warm-start cycle")
    tolerance: float | None = option(None, "deprecated: sets --margin", hidden=True)
    accept_data_change: bool = option(False, "train this cycle even if the data checks refuse the new data "
                                      "(the record says so)")
    drift_alpha: float = option(shift.ALPHA, "refuse data whose shift the current model sees (BBSD: a "
                                "Kolmogorov-Smirnov test per class of its softmax, Bonferroni) at this level")
    canary_python: str | None = option(None, "the Python of the serving environment, which loads the candidate "
                                       "before it is promoted (default: this one)", metavar="PYTHON")
    registered_model: str = option(
        registry.REGISTERED_MODEL, "with tracking on (--track, --tracking-uri or $MLFLOW_TRACKING_URI): the MLflow "
        f"registered model of the store's versions; its alias {registry.CHAMPION!r} follows current.json. "
        "--track alone keeps the registry in <store>/mlflow.db", metavar="NAME")
    list: bool = option(False, "list the versions and exit", exclusive="action")
    sync_tracking: bool = option(False, "bring the MLflow registry in line with the store (after the tracking "
                                 "server was down during a cycle) and exit", exclusive="action")
    rollback: str | None = option(None, "point current at an earlier version (with --force: even a rejected one)",
                                  metavar="VERSION", exclusive="action")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_options(parser, Config)  # every training flag, as mnist-train declares them
    add_options(parser, Options, title="retraining")
    add_options(parser, Policy, title="promotion (the paired gate against the current version)")
    parser.epilog = ("--force also retrains when nothing changed, and lets --rollback choose a "
                     f"rejected version or repair a corrupt current.json. Exit status: {EXIT_CODES}.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.store:
        return fail("--store DIR is required: the model store this cycle reads and writes")
    if args.warm_start and args.init_from:
        return fail("--warm-start starts from the store's current version; drop --init-from")
    if args.warm_epochs < 1:
        return fail(f"--warm-epochs must be at least 1, got {args.warm_epochs}")
    if not 0 < args.drift_alpha < 1:
        return fail(f"--drift-alpha must lie strictly between 0 and 1, got {args.drift_alpha}")
    for flag in ("output", "run_name"):
        if getattr(args, flag) != parser.get_default(flag):
            return fail(f"--{flag.replace('_', '-')} is chosen by retrain (the version id and "
                            "its folder in the store); drop it")
    if args.tolerance is not None:
        print("notice: --tolerance is deprecated; it sets --margin, which the gate now tests with a paired "
              "test (see --help)", file=sys.stderr, flush=True)
        args.margin = args.tolerance
    try:
        policy = options_from(Policy, args)
        cfg = options_from(Config, args)
        store = Store(args.store)
        uri = connection.tracking_uri(cfg, store.root)
        if args.sync_tracking and not uri:
            raise UsageError("--sync-tracking needs tracking on: --track, --tracking-uri URI or $MLFLOW_TRACKING_URI")
    except errors.JobError as exc:  # before any work: the flags' fault (exit 2)
        return fail(str(exc))
    except Exception as exc:
        return bug(exc)
    signal.signal(signal.SIGTERM, errors.interrupt)  # `ray job stop`, systemd stop: unlock on the way out
    try:
        if uri:  # MLflow missing: one line, before the lock and any data work
            connection.check_installed(uri)
        if args.list:
            return list_versions(store)
        if args.sync_tracking:
            store.require()
            return 0 if registry.sync_registry(store, cfg, args.registered_model) is not None else 1
        if args.rollback:
            code = rollback(store, args.rollback, args.force)
        else:
            code = retrain(store, cfg, policy, args.warm_epochs if args.warm_start else None,
                           args.accept_data_change, args.canary_python, args.drift_alpha)
        registry.sync_registry(store, cfg, args.registered_model)  # the registry follows the store
        return code
    except LockHeld as exc:
        if args.rollback:
            return fail(f"{exc}; roll back when it has finished", code=1)
        print(f"{exc}; not starting another", flush=True)
        return 0
    except errors.JobError as exc:
        return fail(str(exc), code=exc.exit_code if isinstance(exc, errors.UsageError) else 1)
    except OSError as exc:  # the store's disk failed under a step the checks did not name: still one line
        return fail(f"--store {store.root}: {fs.describe(exc)}; current.json is unchanged", code=1)
    except KeyboardInterrupt:
        return fail("interrupted; current.json is unchanged", code=130)
    except Exception as exc:
        return bug(exc)


def rollback(store: Store, vid: str, force: bool) -> int:
    store.require()
    with store.locked():
        previous = store.rollback(vid, force=force)
    print(f"current is now {vid} (was {previous or 'none'}); model {store.model_path(vid)}", flush=True)
    return 0


def list_versions(store: Store) -> int:
    store.require()
    try:
        pointer, problem = store.pointer(), None
    except StoreError as exc:  # still show what is there; the error follows the table
        pointer, problem = None, str(exc)
    rows = [(r, status_of(r, pointer)) for r in store.records()]
    print(format_table(rows), flush=True)
    return fail(problem, code=1) if problem else 0


def format_table(rows: list[tuple[VersionRecord, str]]) -> str:
    """One line a version. VS CURRENT: images only the new model got right / only the current one
    did, and the p-value of "significantly worse"; WORST DIGIT: the largest fall of one digit's recall."""
    from trainer.promote.gate import summary  # scipy, for --list only

    header = ("VERSION", "STATUS", "TEST ACC", "VS CURRENT", "WORST DIGIT", "PARENT", "DATA HASH", "CREATED", "NOTE")
    lines = [header]
    for record, status in rows:
        accuracy = record.test_accuracy
        lines.append((
            record.version, status,
            f"{accuracy:.4f}" if isinstance(accuracy, (int, float)) else "-",
            *summary(record.gate or {}),
            record.parent or "-",
            (record.data.get("content_sha256") or "-")[:DATA_HASH_CHARS],
            (record.started or "-").replace("T", " "),
            (record.reason or "") if status in (REJECTED, *NO_MODEL) else "",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1]).rstrip()
                     for line in lines)

