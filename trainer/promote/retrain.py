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
import dataclasses
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass

from trainer.common import errors, fs, provenance
from trainer.common.cli import add_options, bug, fail, option, options_from
from trainer.common.clock import iso, utc_now
from trainer.common.errors import UsageError
from trainer.common.lock import LockHeld
from trainer.config import Config
from trainer.data import shards, shift
from trainer.promote import promotion, registry
from trainer.promote.policy import Policy, fingerprint
from trainer.store.model_store import DATA, RUNS, STAGING, Store, StoreError
from trainer.store.record import VersionRecord
from trainer.store.versions import FAILED, NO_MODEL, REFUSED, REJECTED, new_version_id, status_of
from trainer.track import connection
from trainer.train import driver, warm

DESCRIPTION = ("Retrain the MNIST model into a versioned model store; promote it only if it is "
               "not significantly worse than the current one. Takes every training flag too.")
EXIT_REJECTED, EXIT_REFUSED, EXIT_CANARY = 3, 4, 5
EXIT_CODES = ("0 promoted, nothing changed, or another run holds the store; 1 an error; 2 bad flags; "
              f"{EXIT_REJECTED} rejected by the gate; {EXIT_REFUSED} refused to train on the data "
              f"(--accept-data-change); {EXIT_CANARY} the canary failed")
WARM_EPOCHS = 1  # reaches a 5-epoch cold run's test accuracy on full MNIST (scripts/warm_vs_cold.py)
DATA_HASH_CHARS = 12


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


def retrain(store: Store, cfg: Config, policy: Policy, warm_epochs: int | None = None,
            accept_data_change: bool = False, canary_python: str | None = None,
            drift_alpha: float = shift.ALPHA) -> int:
    """One cycle; `warm_epochs` (--warm-start) trains that long from the current version, if any."""
    place = fs.Place.check("--store", store.root)  # read-only or full: one line, before the lock
    store.create()
    with store.locked() as owner:
        if owner.get("took_over"):
            held = owner["took_over"]
            print(f"took over a stale lock (pid {held.get('pid')} on {held.get('hostname')}, "
                  f"since {held.get('started')})", flush=True)
        store.clean_staging()
        current = store.current_id()  # a corrupt pointer stops us here, before anything is written
        cfg = dataclasses.replace(cfg, store=store.root)
        if warm_epochs and current is not None:  # the recipe is then "warm": a change, once, from a cold one
            cfg = dataclasses.replace(cfg, init_from="store:current", epochs=warm_epochs)
        parent = warm.resolve(cfg)[1] if cfg.init_from else None
        source = shards.resolve_source(cfg.data)
        if source and "://" not in source:
            source = os.path.abspath(source)  # the record outlives the working directory
        parquet_dir, mnist, manifest = shards.prepare(source, store.path(DATA), whole=False)
        started = time.monotonic()
        profile, mnist = promotion.survey(parquet_dir, manifest, mnist)  # the test split, a training sample
        surveyed = round(time.monotonic() - started, 2)
        digest = manifest.content_sha256
        if current is not None and not cfg.force and unchanged(store.record(current), cfg, digest):
            print(f"nothing changed since the current version {current} (data sha256 "
                  f"{digest[:DATA_HASH_CHARS]}, same training config); not retraining. "
                  "Pass --force to retrain anyway.", flush=True)
            return 0
        vid = new_version_id()
        data = {"content_sha256": digest, "path": parquet_dir, "source": source,
                "train_rows": manifest.rows("train"), "test_rows": manifest.rows("test"),
                "profile": profile}
        record = VersionRecord(vid, parent=parent, started=iso(utc_now()), git_commit=provenance.git_commit(),
                               host=socket.gethostname(), config=cfg.to_dict(), data=data,
                               data_checks={**promotion.check_data(store, current, profile, accept_data_change),
                                            "seconds": {"survey": surveyed}})  # the checks' cost
        if record.data_checks["problems"] and not accept_data_change:  # before TensorFlow: the thresholds
            return refuse(store, record, current)
        model = (promotion.load_model(store.model_path(current), cfg.verbose, f"current version {current}")
                 if current else None)  # an unreadable current model stops the cycle before training
        started = time.monotonic()
        found = promotion.check_shift(store, current, model, mnist) if current else None
        if found is not None:
            checked = promotion.with_shift(record.data_checks, found, drift_alpha, accept_data_change)
            record = record.advance(data_checks={**checked, "seconds": {
                "survey": surveyed, "shift": round(time.monotonic() - started, 2)}})
            if record.data_checks["problems"] and not accept_data_change:
                return refuse(store, record, current)
        baseline = promotion.score(model, mnist, f"current version {current}") if current else None
        run_cfg = dataclasses.replace(
            cfg, data=parquet_dir, output=store.new_staging(vid), run_name=vid,
            storage_path=cfg.storage_path or store.path(RUNS),
            tracking_uri=connection.tracking_uri(cfg, store.root))  # --track alone: the store's own mlflow.db
        record = record.advance(config=run_cfg.to_dict())
        print(f"retraining version {vid} (data sha256 {digest[:DATA_HASH_CHARS]}; current "
              f"{current or 'none'}" + (f"; starting from {parent}" if parent else "") + ")", flush=True)

        try:
            metrics = driver.run(run_cfg)
        except BaseException as exc:  # Ctrl-C and SIGTERM too: every run leaves a record
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else errors.first_line(exc, named=True, limit=300)
            try:
                store.register_failure(record.advance(decision=FAILED, reason=reason, finished=iso(utc_now())))
            except OSError:  # the store's disk is what failed: no record, and no half of one
                shutil.rmtree(store.path(STAGING, vid), ignore_errors=True)
            raise
        place.unchanged()  # the store's mount still there before anything is registered in it
        verdict = promotion.decide(store, vid, current, baseline, mnist, policy, canary_python, cfg.verbose)
        code = {promotion.PROMOTE: 0, promotion.GATE: EXIT_REJECTED, promotion.CANARY: EXIT_CANARY}[verdict.outcome]
        record = record.advance(test_accuracy=metrics.test_accuracy, test_loss=metrics.test_loss,
                                tracking=metrics.tracking, **verdict.fields(), finished=iso(utc_now()))
        store.register(record)
        if code == 0:
            store.promote(vid)
        pruned = store.prune(policy.keep_versions)
    if code == 0:
        print(f"promoted {vid}: {record.reason}; it is now current ({store.model_path(vid)})", flush=True)
    else:
        print(f"rejected {vid}: {record.reason}; current stays {current or 'none'}", flush=True)
    if pruned:
        print(f"pruned {len(pruned)} old version(s): {', '.join(pruned)}", flush=True)
    return code


def refuse(store: Store, record: VersionRecord, current: str | None) -> int:
    """Record the refusal (exit 4): nothing was trained, current stays."""
    reason = "; ".join(record.data_checks["problems"])
    store.register_failure(record.advance(decision=REFUSED, reason=reason, finished=iso(utc_now())))
    print(f"refused {record.version}: {reason}; nothing was trained and current stays {current}. Check the data; "
          "pass --accept-data-change to train on it anyway", flush=True)
    return EXIT_REFUSED


def unchanged(record: VersionRecord, cfg: Config, data_sha256: str) -> bool:
    return (fingerprint(record.config, record.data.get("content_sha256"))
            == fingerprint(cfg.to_dict(), data_sha256))


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

