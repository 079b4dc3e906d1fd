"""One retraining cycle against a model store, the body of mnist-retrain (trainer/promote/retrain.py)
and of a search's --store (trainer/tune/): lock the store -> prepare the data -> stop if nothing
changed -> the data checks -> train and evaluate (trainer.train.driver.run) into staging/<id> ->
the paired gate -> the canary -> register the version, and move current.json if it passed.

Exit codes (EXIT_CODES): 0 promoted or nothing changed; 3 rejected by the gate; 4 refused to train
on the data; 5 passed the gate but failed the canary. Every code above 2 keeps a record.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time

from trainer.common import errors, fs, provenance
from trainer.common.clock import iso, utc_now
from trainer.config import Config
from trainer.data import shards, shift
from trainer.promote import promotion
from trainer.promote.policy import Policy, fingerprint
from trainer.store.model_store import DATA, RUNS, STAGING, Store
from trainer.store.record import VersionRecord
from trainer.store.versions import FAILED, REFUSED, new_version_id
from trainer.track import connection
from trainer.train import driver, warm

EXIT_REJECTED, EXIT_REFUSED, EXIT_CANARY = 3, 4, 5
EXIT_CODES = ("0 promoted, nothing changed, or another run holds the store; 1 an error; 2 bad flags; "
              f"{EXIT_REJECTED} rejected by the gate; {EXIT_REFUSED} refused to train on the data "
              f"(--accept-data-change); {EXIT_CANARY} the canary failed")
DATA_HASH_CHARS = 12


def retrain(store: Store, cfg: Config, policy: Policy, warm_epochs: int | None = None,
            accept_data_change: bool = False, canary_python: str | None = None,
            drift_alpha: float = shift.ALPHA, run_started: float | None = None) -> int:
    """One cycle; `warm_epochs` (--warm-start) trains that long from the current version, if any;
    the run's timeline counts from `run_started` (a Unix time) if given (driver.run)."""
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
            metrics = driver.run(run_cfg, started=run_started)
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
