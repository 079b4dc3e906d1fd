"""What decides a version's fate after the data is prepared: the data checks against the current
version's profile (trainer/data/checks.py) and its shift reference (trainer/data/shift.py), both
models scored on the same test images, the paired gate (trainer/promote/gate.py) and the canary
(trainer/promote/canary.py). trainer/promote/cycle.py runs the cycle around it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from trainer.common import errors, quiet
from trainer.common.atomic import replacing
from trainer.data import checks, shards, shift
from trainer.promote import canary
from trainer.promote.policy import Policy
from trainer.store.model_store import STAGING, Store, StoreError
from trainer.store.versions import PASSED, REJECTED

PROMOTE, GATE, CANARY = "promote", "gate", "canary"


def check_data(store: Store, current: str | None, new: dict, accept: bool) -> dict:
    """The data checks against the current version's profile: {"problems", "accepted", "limits", ...}."""
    limits = checks.Limits()
    old = store.record(current).data.get("profile") if current else None
    if old is None:
        if current:  # a version recorded before the data checks: nothing to compare with, once
            print(f"the current version {current} has no data profile; not checking the data this cycle", flush=True)
        return {"problems": [], "baseline_version": None, "limits": dataclasses.asdict(limits)}
    problems = checks.compare(old, new, limits)
    if problems and accept:
        print(f"--accept-data-change: training despite {'; '.join(problems)}", flush=True)
    return {"problems": problems, "accepted": bool(problems and accept), "baseline_version": current,
            "overlap": checks.overlap(old, new), "limits": dataclasses.asdict(limits)}


def survey(parquet_dir: str, manifest, mnist: shards.Mnist | None) -> tuple[dict, shards.Mnist]:
    """The arriving data as the checks need it, in one pass over its training split: the profile
    (trainer/data/checks.py), and the test split with the fixed sample of training rows that BBSD tests
    (trainer/data/shift.py) in place of the whole training split. Arrays already in memory (a small
    source) are used as they are; Parquet shards are read one at a time (shards.scan), so 8.1M rows
    cost one shard's memory."""
    if mnist is not None:
        x_test, y_test, pieces = mnist.x_test, mnist.y_test, [(mnist.x_train, mnist.y_train)]
    else:
        (x_test, y_test), pieces = shards.read_parquet_split(parquet_dir, "test", manifest), shards.scan(
            parquet_dir, manifest)
    rows = shift.sample_rows(manifest.rows("train"), shift.SAMPLE_ROWS, shift.SEED)
    profiler, xs, ys, start = checks.Profiler(x_test), [], [], 0
    for x, y in pieces:
        profiler.add(x, y)
        at = rows[(rows >= start) & (rows < start + len(y))] - start
        xs.append(x[at])
        ys.append(y[at])
        start += len(y)
    return profiler.profile(), shards.Mnist(np.concatenate(xs), np.concatenate(ys), x_test, y_test)


def with_shift(data_checks: dict, found: shift.Shift, alpha: float, accept: bool) -> dict:
    """The data checks' record with BBSD's result in it, and its problem if it refuses the data."""
    problems = list(data_checks["problems"])
    if found.p_value < alpha:
        problems.append(found.describe(alpha))
        if accept:
            print(f"--accept-data-change: training despite {problems[-1]}", flush=True)
    return {**data_checks, "problems": problems, "accepted": bool(problems and accept),
            "shift": {**found.to_dict(), "alpha": alpha}}


@dataclass(frozen=True)
class Verdict:
    """What decide() settled: the outcome (PROMOTE, GATE: rejected by the gate, CANARY: failed the
    canary) and the version record's fields that say so."""
    outcome: str
    decision: str  # trainer/store/versions.py's PASSED or REJECTED
    reason: str
    gate: dict
    canary: dict | None = None

    def fields(self) -> dict:
        """The version record's fields (VersionRecord.advance)."""
        return {"decision": self.decision, "reason": self.reason, "gate": self.gate, "canary": self.canary}


def decide(store: Store, vid: str, current: str | None, baseline, mnist: shards.Mnist, policy: Policy,
           canary_python: str | None, verbose: bool = False) -> Verdict:
    """Score the new model on this data's test split, gate it against the current one's
    probabilities (`baseline`, from `score`; None if there is no current version), and run the canary
    on a candidate that passed."""
    from trainer.promote import gate  # scipy: only a cycle that got this far

    model = load_model(store.path(STAGING, vid, "mnist.keras"), verbose, f"new version {vid}")
    candidate = score(model, mnist, f"new version {vid}")
    keep_reference(model, mnist, store.path(STAGING, vid, shift.REFERENCE))
    decision = gate.compare(mnist.y_test, None if baseline is None else baseline.argmax(axis=1),
                            candidate.argmax(axis=1), policy)
    gated = {**decision.record, "baseline_version": current}
    if not decision.promote:
        return Verdict(GATE, REJECTED, decision.reason, gated)
    images = slice(0, canary.IMAGES)
    try:
        figures = canary.check(store.path(STAGING, vid), mnist.x_test[images], candidate[images], canary_python)
    except canary.CanaryError as exc:
        return Verdict(CANARY, REJECTED, str(exc), gated, {"error": str(exc)})
    return Verdict(PROMOTE, PASSED, decision.reason, gated, figures)


def load_model(path: str, verbose: bool, name: str):
    """The Keras model at `path`, loaded in this process; a StoreError that says so if unreadable."""
    quiet.import_tensorflow(verbose)
    import keras

    try:
        return keras.saving.load_model(path)
    except Exception as exc:
        raise StoreError(f"{name}'s model {path} is unreadable ({errors.first_line(exc, named=True)}); "
                         "roll back to another version with --rollback") from None


def score(model, mnist: shards.Mnist, name: str):
    """The model's probabilities on this data's test images (the data may have changed since it was
    trained)."""
    from trainer.model.network import evaluate

    _, accuracy, probs = evaluate(model, mnist.x_test, mnist.y_test)
    print(f"{name}: test accuracy {accuracy:.4f} on this data's test split", flush=True)
    return probs


def outputs_on_sample(model, mnist: shards.Mnist):
    """The model's softmax on the fixed sample of this data's training split that BBSD tests (all of
    it where the split is that sample already, as survey() hands it over)."""
    from trainer.model.network import evaluate

    rows = shift.sample_rows(len(mnist.y_train), shift.SAMPLE_ROWS, shift.SEED)
    return evaluate(model, mnist.x_train[rows], mnist.y_train[rows])[2]


def keep_reference(model, mnist: shards.Mnist, path: str) -> None:
    """A version's BBSD reference: its model's outputs on the sample of its own training split."""
    outputs = outputs_on_sample(model, mnist).astype(np.float32)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, outputs, allow_pickle=False)


def check_shift(store: Store, current: str, model, mnist: shards.Mnist) -> shift.Shift | None:
    """BBSD: the current model's outputs on the arriving training split against its reference (None
    for a version kept before the reference was: nothing to test against, this once)."""
    path = os.path.join(store.version_dir(current), shift.REFERENCE)
    if not os.path.exists(path):
        print(f"the current version {current} has no shift reference; not testing for a shift this cycle",
              flush=True)
        return None
    return shift.bbsd(np.load(path, allow_pickle=False), outputs_on_sample(model, mnist))
