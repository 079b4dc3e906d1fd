"""Scheduled retraining: one cycle against a model store, or --list / --rollback. `main(argv)` is
the `mnist-retrain` console script and jobs/retrain.py.

    python jobs/retrain.py --store /srv/mnist-store --data ../shared/data/mnist
    python jobs/retrain.py --store /srv/mnist-store --data ../shared/data/mnist --warm-start
    python jobs/retrain.py --store /srv/mnist-store --list
    python jobs/retrain.py --store /srv/mnist-store --rollback 20261128T020000Z-1a2b3c
    python jobs/retrain.py --store /srv/mnist-store --tracking-uri http://127.0.0.1:5000 --sync-tracking

A cycle: lock the store -> prepare the data (Parquet shards + content hash) -> stop if neither the
data nor the training config changed since the current version -> check the data against the
current version's profile (trainer/data_checks.py; refuse to train on a bad change) -> train and
evaluate with trainer.driver.run into staging/<id> -> score both models on this data's test split
-> the paired gate (trainer/gate.py) -> the canary (trainer/canary.py) -> register versions/<id>
(with the decision and its numbers) -> move current.json if promoted -> prune -> unlock. With
tracking on (--track, --tracking-uri, $MLFLOW_TRACKING_URI), the MLflow registry then follows the
store (trainer/tracking.py), as it does after --rollback and on --sync-tracking.
With --warm-start a cycle starts from the current version's weights (its `parent`, in version.json
and --list) and trains --warm-epochs; the checks are the same.

Exit status (EXIT_CODES): 0 promoted, nothing changed, or another run holds the store (a schedule
that fires while the last run still trains is not an error); 1 an error (current.json untouched; a
"failed" record is kept); 2 bad flags; 3 trained but rejected by the gate; 4 refused to train on
the data; 5 passed the gate but failed the canary. Every code above 2 keeps a record (--list).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys

from trainer import cli, data, data_checks, errors, promotion, storage, tracking, warm
from trainer.config import Config
from trainer.lock import LockHeld
from trainer.policy import (FAILED, NO_MODEL, REFUSED, REJECTED, Policy, fingerprint, iso, new_version_id, status_of,
                            utc_now)
from trainer.store import DATA, RUNS, STAGING, Store, StoreError

DESCRIPTION = ("Retrain the MNIST model into a versioned model store; promote it only if it is "
               "not significantly worse than the current one. Takes every training flag too.")
EXIT_REJECTED, EXIT_REFUSED, EXIT_CANARY = 3, 4, 5
EXIT_CODES = ("0 promoted, nothing changed, or another run holds the store; 1 an error; 2 bad flags; "
              f"{EXIT_REJECTED} rejected by the gate; {EXIT_REFUSED} refused to train on the data "
              f"(--accept-data-change); {EXIT_CANARY} the canary failed")
WARM_EPOCHS = 1  # reaches a 5-epoch cold run's test accuracy on full MNIST (scripts/warm_vs_cold.py)
DATA_HASH_CHARS = 12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(DESCRIPTION)
    group = parser.add_argument_group("retraining")
    group.add_argument("--warm-start", action="store_true",
                       help="start each cycle from the current version's weights (--init-from "
                       "store:current) and train --warm-epochs; with no current version yet, train "
                       "from scratch for --epochs")
    group.add_argument("--warm-epochs", type=int, default=WARM_EPOCHS,
                       help="epochs of a --warm-start cycle")
    group.add_argument("--alpha", type=float, default=Policy.alpha,
                       help="reject a model significantly worse than the current one at this level "
                       "(McNemar's exact test on the same test images, overall and per digit)")
    group.add_argument("--margin", type=float, default=Policy.margin,
                       help="reject only a model significantly worse than the current one by more than "
                       "this much accuracy (0.002: 0.2 points; 0 tests for any drop)")
    group.add_argument("--digit-margin", type=float, default=Policy.digit_margin,
                       help="the same for one digit's recall")
    group.add_argument("--require-improvement", action="store_true",
                       help="promote only a model significantly better than the current one")
    group.add_argument("--tolerance", type=float, help=argparse.SUPPRESS)  # deprecated alias of --margin
    group.add_argument("--min-accuracy", type=float, default=Policy.min_accuracy,
                       help="never promote below this test accuracy")
    group.add_argument("--keep-versions", type=int, default=Policy.keep_versions,
                       help="keep this many versions (the current one always), prune older ones")
    group.add_argument("--accept-data-change", action="store_true",
                       help="train this cycle even if the data checks refuse the new data (the record says so)")
    group.add_argument("--canary-python", metavar="PYTHON",
                       help="the Python of the serving environment, which loads the candidate before "
                       "it is promoted (default: this one)")
    group.add_argument("--registered-model", default=tracking.REGISTERED_MODEL, metavar="NAME",
                       help="with tracking on (--track, --tracking-uri or $MLFLOW_TRACKING_URI): the MLflow "
                       f"registered model of the store's versions; its alias {tracking.CHAMPION!r} follows current.json. "
                       "--track alone keeps the registry in <store>/mlflow.db")
    action = group.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the versions and exit")
    action.add_argument("--sync-tracking", action="store_true",
                        help="bring the MLflow registry in line with the store (after the tracking server was "
                        "down during a cycle) and exit")
    action.add_argument("--rollback", metavar="VERSION",
                        help="point current at an earlier version (with --force: even a rejected one)")
    # The training flags' --force (retrain a finished run) doubles as retrain's; add it if gone.
    if "force" not in {f.name for f in dataclasses.fields(Config)}:
        group.add_argument("--force", action="store_true")
    parser.epilog = ("--force also retrains when nothing changed, and lets --rollback choose a "
                     f"rejected version or repair a corrupt current.json. Exit status: {EXIT_CODES}.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.store:
        return cli.fail("--store DIR is required: the model store this cycle reads and writes")
    if args.warm_start and args.init_from:
        return cli.fail("--warm-start starts from the store's current version; drop --init-from")
    if args.warm_epochs < 1:
        return cli.fail(f"--warm-epochs must be at least 1, got {args.warm_epochs}")
    for flag in ("output", "run_name"):
        if getattr(args, flag) != parser.get_default(flag):
            return cli.fail(f"--{flag.replace('_', '-')} is chosen by retrain (the version id and "
                            "its folder in the store); drop it")
    if args.tolerance is not None:
        print("notice: --tolerance is deprecated; it sets --margin, which the gate now tests with a paired "
              "test (see --help)", file=sys.stderr, flush=True)
        args.margin = args.tolerance
    try:
        policy = Policy(args.alpha, args.margin, args.digit_margin, args.require_improvement, args.min_accuracy,
                        args.keep_versions)
        cfg = cli.config_from_args(args)
        store = Store(args.store)
        uri = tracking.tracking_uri(cfg, store.root)
        if args.sync_tracking and not uri:
            raise ValueError("--sync-tracking needs tracking on: --track, --tracking-uri URI or $MLFLOW_TRACKING_URI")
    except (ValueError, StoreError) as exc:
        return cli.fail(str(exc))
    try:
        if uri:  # MLflow missing: one line, before the lock and any data work
            tracking.check_installed(uri)
    except tracking.TrackingError as exc:
        return cli.fail(str(exc), code=1)
    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError
    from trainer.cluster import ClusterError
    from trainer.driver import TrainingError
    from trainer.storage import StorageError, describe

    signal.signal(signal.SIGTERM, errors.interrupt)  # `ray job stop`, systemd stop: unlock on the way out
    try:
        if args.list:
            return list_versions(store)
        if args.sync_tracking:
            store.require()
            return 0 if tracking.sync_registry(store, cfg, args.registered_model) is not None else 1
        if args.rollback:
            code = rollback(store, args.rollback, args.force)
        else:
            code = retrain(store, cfg, policy, args.warm_epochs if args.warm_start else None,
                           args.accept_data_change, args.canary_python)
        tracking.sync_registry(store, cfg, args.registered_model)  # the registry follows the store
        return code
    except LockHeld as exc:
        if args.rollback:
            return cli.fail(f"{exc}; roll back when it has finished", code=1)
        print(f"{exc}; not starting another", flush=True)
        return 0
    except (StoreError, DataError, ClusterError, CheckpointError, TrainingError, StorageError, ValueError) as exc:
        return cli.fail(str(exc), code=1)
    except OSError as exc:  # the store's disk failed under a step the checks did not name: still one line
        return cli.fail(f"--store {store.root}: {describe(exc)}; current.json is unchanged", code=1)
    except KeyboardInterrupt:
        return cli.fail("interrupted; current.json is unchanged", code=130)


def retrain(store: Store, cfg: Config, policy: Policy, warm_epochs: int | None = None,
            accept_data_change: bool = False, canary_python: str | None = None) -> int:
    """One cycle; `warm_epochs` (--warm-start) trains that long from the current version, if any."""
    place = storage.Place.check("--store", store.root)  # read-only or full: one line, before the lock
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
        source = data.resolve_source(cfg.data)
        if source and "://" not in source:
            source = os.path.abspath(source)  # the record outlives the working directory
        parquet_dir, mnist, manifest = data.prepare(source, store.path(DATA))
        digest = manifest["content_sha256"]
        if current is not None and not cfg.force and unchanged(store.record(current), cfg, digest):
            print(f"nothing changed since the current version {current} (data sha256 "
                  f"{digest[:DATA_HASH_CHARS]}, same training config); not retraining. "
                  "Pass --force to retrain anyway.", flush=True)
            return 0
        vid = new_version_id()
        record = {
            "version": vid, "parent": parent, "started": iso(utc_now()), "git_commit": git_commit(),
            "host": socket.gethostname(), "config": cfg.to_dict(),
            "data": {"content_sha256": digest, "path": parquet_dir, "source": source,
                     "train_rows": manifest["splits"]["train"]["rows"],
                     "test_rows": manifest["splits"]["test"]["rows"], "profile": data_checks.profile(mnist)},
        }
        record["data_checks"] = promotion.check_data(store, current, record["data"]["profile"], accept_data_change)
        if record["data_checks"]["problems"] and not accept_data_change:
            reason = "; ".join(record["data_checks"]["problems"])
            store.register_failure(vid, {**record, "decision": REFUSED, "reason": reason, "finished": iso(utc_now())})
            print(f"refused {vid}: {reason}; nothing was trained and current stays {current}. Check the data; "
                  "pass --accept-data-change to train on it anyway", flush=True)
            return EXIT_REFUSED
        baseline = (promotion.score(store.model_path(current), mnist, cfg.verbose, f"current version {current}")
                    if current else None)  # an unreadable current model stops the cycle before training
        run_cfg = dataclasses.replace(
            cfg, data=parquet_dir, output=store.new_staging(vid), run_name=vid,
            storage_path=cfg.storage_path or store.path(RUNS),
            tracking_uri=tracking.tracking_uri(cfg, store.root))  # --track alone: the store's own mlflow.db
        record["config"] = run_cfg.to_dict()
        print(f"retraining version {vid} (data sha256 {digest[:DATA_HASH_CHARS]}; current "
              f"{current or 'none'}" + (f"; starting from {parent}" if parent else "") + ")", flush=True)
        from trainer import driver

        try:
            metrics = driver.run(run_cfg)
        except BaseException as exc:  # Ctrl-C and SIGTERM too: every run leaves a record
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else errors.first_line(exc, named=True, limit=300)
            try:
                store.register_failure(vid, {**record, "decision": FAILED, "reason": reason,
                                             "finished": iso(utc_now())})
            except OSError:  # the store's disk is what failed: no record, and no half of one
                shutil.rmtree(store.path(STAGING, vid), ignore_errors=True)
            raise
        place.unchanged()  # the store's mount still there before anything is registered in it
        record.update(test_accuracy=metrics["test_accuracy"], test_loss=metrics["test_loss"],
                      tracking=metrics.get("tracking"))
        code = {promotion.PROMOTE: 0, promotion.GATE: EXIT_REJECTED, promotion.CANARY: EXIT_CANARY}[
            promotion.decide(store, vid, current, baseline, mnist, policy, canary_python, record, cfg.verbose)]
        record["finished"] = iso(utc_now())
        store.register(vid, record)
        if code == 0:
            store.promote(vid)
        pruned = store.prune(policy.keep_versions)
    if code == 0:
        print(f"promoted {vid}: {record['reason']}; it is now current ({store.model_path(vid)})", flush=True)
    else:
        print(f"rejected {vid}: {record['reason']}; current stays {current or 'none'}", flush=True)
    if pruned:
        print(f"pruned {len(pruned)} old version(s): {', '.join(pruned)}", flush=True)
    return code


def unchanged(record: dict, cfg: Config, data_sha256: str) -> bool:
    return (fingerprint(record.get("config", {}), record.get("data", {}).get("content_sha256"))
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
    return cli.fail(problem, code=1) if problem else 0


def format_table(rows: list[tuple[dict, str]]) -> str:
    """One line a version. VS CURRENT: images only the new model got right / only the current one
    did, and the p-value of "significantly worse"; WORST DIGIT: the largest fall of one digit's recall."""
    from trainer.gate import summary

    header = ("VERSION", "STATUS", "TEST ACC", "VS CURRENT", "WORST DIGIT", "PARENT", "DATA HASH", "CREATED", "NOTE")
    lines = [header]
    for record, status in rows:
        accuracy = record.get("test_accuracy")
        lines.append((
            record.get("version", "?"), status,
            f"{accuracy:.4f}" if isinstance(accuracy, (int, float)) else "-",
            *summary(record.get("gate") or {}),
            record.get("parent") or "-",
            (record.get("data", {}).get("content_sha256") or "-")[:DATA_HASH_CHARS],
            (record.get("started") or "-").replace("T", " "),
            record.get("reason", "") if status in (REJECTED, *NO_MODEL) else "",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1]).rstrip()
                     for line in lines)


def git_commit() -> str | None:
    """$MNIST_GIT_COMMIT (set by scripts/submit_retrain.sh: a submitted working dir has no .git),
    else this checkout's HEAD, with -dirty when tracked files differ from it."""
    if os.environ.get("MNIST_GIT_COMMIT"):
        return os.environ["MNIST_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


