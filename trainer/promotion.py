"""What decides a version's fate after the data is prepared: the data checks against the current
version's profile (trainer/data_checks.py), both models scored on the same test images, the paired
gate (trainer/gate.py) and the canary (trainer/canary.py). trainer/retrain.py runs the cycle around it.
"""

from __future__ import annotations

import dataclasses

from trainer import data, data_checks, errors, quiet
from trainer.policy import PASSED, REJECTED, Policy
from trainer.store import STAGING, Store, StoreError

PROMOTE, GATE, CANARY = "promote", "gate", "canary"


def check_data(store: Store, current: str | None, new: dict, accept: bool) -> dict:
    """The data checks against the current version's profile: {"problems", "accepted", "limits", ...}."""
    limits = data_checks.Limits()
    old = store.record(current).get("data", {}).get("profile") if current else None
    if old is None:
        if current:  # a version recorded before the data checks: nothing to compare with, once
            print(f"the current version {current} has no data profile; not checking the data this cycle", flush=True)
        return {"problems": [], "baseline_version": None, "limits": dataclasses.asdict(limits)}
    problems = data_checks.compare(old, new, limits)
    if problems and accept:
        print(f"--accept-data-change: training despite {'; '.join(problems)}", flush=True)
    return {"problems": problems, "accepted": bool(problems and accept), "baseline_version": current,
            "overlap": data_checks.overlap(old, new), "limits": dataclasses.asdict(limits)}


def decide(store: Store, vid: str, current: str | None, baseline, mnist: data.Mnist, policy: Policy,
           canary_python: str | None, record: dict, verbose: bool = False) -> str:
    """Score the new model on this data's test split, gate it against the current one's
    probabilities (`baseline`, from `score`; None if there is no current version), and run the canary
    on a candidate that passed; fill in `record`'s decision and say which: PROMOTE, GATE (rejected)
    or CANARY (failed)."""
    from trainer import canary, gate

    candidate = score(store.path(STAGING, vid, "mnist.keras"), mnist, verbose, f"new version {vid}")
    decision = gate.compare(mnist.y_test, None if baseline is None else baseline.argmax(axis=1),
                            candidate.argmax(axis=1), policy)
    record.update(decision=PASSED if decision.promote else REJECTED, reason=decision.reason,
                  gate={**decision.record, "baseline_version": current})
    if not decision.promote:
        return GATE
    images = slice(0, canary.IMAGES)
    try:
        record["canary"] = canary.check(store.path(STAGING, vid), mnist.x_test[images], candidate[images],
                                        canary_python)
    except canary.CanaryError as exc:
        record.update(decision=REJECTED, reason=str(exc), canary={"error": str(exc)})
        return CANARY
    return PROMOTE


def score(path: str, mnist: data.Mnist, verbose: bool, name: str):
    """The probabilities of the model at `path` on this data's test images (the data may have changed
    since it was trained), loaded and run in this process."""
    quiet.import_tensorflow(verbose)
    import keras

    from trainer.model import evaluate

    try:
        model = keras.saving.load_model(path)
    except Exception as exc:
        raise StoreError(f"{name}'s model {path} is unreadable ({errors.first_line(exc, named=True)}); "
                         "roll back to another version with --rollback") from None
    _, accuracy, probs = evaluate(model, mnist.x_test, mnist.y_test)
    print(f"{name}: test accuracy {accuracy:.4f} on this data's test split", flush=True)
    return probs

