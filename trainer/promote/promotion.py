"""What decides a version's fate after the data is prepared: the data checks against the current
version's profile (trainer/data/checks.py), both models scored on the same test images, the paired
gate (trainer/promote/gate.py) and the canary (trainer/promote/canary.py). trainer/promote/retrain.py runs the cycle around it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainer.common import errors, quiet
from trainer.data import checks, shards
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

    candidate = score(store.path(STAGING, vid, "mnist.keras"), mnist, verbose, f"new version {vid}")
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


def score(path: str, mnist: shards.Mnist, verbose: bool, name: str):
    """The probabilities of the model at `path` on this data's test images (the data may have changed
    since it was trained), loaded and run in this process."""
    quiet.import_tensorflow(verbose)
    import keras

    from trainer.model.network import evaluate

    try:
        model = keras.saving.load_model(path)
    except Exception as exc:
        raise StoreError(f"{name}'s model {path} is unreadable ({errors.first_line(exc, named=True)}); "
                         "roll back to another version with --rollback") from None
    _, accuracy, probs = evaluate(model, mnist.x_test, mnist.y_test)
    print(f"{name}: test accuracy {accuracy:.4f} on this data's test split", flush=True)
    return probs

