"""The promotion gate: a paired test of the candidate against the current model on the same test images.

Both models predict the same images, so only the images where exactly one of them is right say
anything about which is better (McNemar). Under "equally good", each such image is a fair coin:
the exact binomial test on those discordant images gives the p-value, with no large-sample
approximation. The same test runs per digit (recall: the images of that digit), with Holm's
correction over the ten, so a regression on one digit cannot hide in the mean.

Two trainings of one recipe are not equally good image by image: their seeds move a digit's recall
by about 0.6 points (sd), and a pair differs on some digit by up to 2.9 points (four full-MNIST
runs, docs/operations.md). A test with no margin calls that significant (9 of 12 such pairs were
rejected), so the test is for "worse by more than a margin": Policy.margin overall, and
Policy.digit_margin a digit (non-inferiority, as a clinical trial tests a new drug).

    decision = compare(y_true, current_pred, candidate_pred, Policy())
    decision.promote, decision.reason, decision.record   # record: what version.json keeps

Pure numpy and scipy; nothing here knows about Ray, TensorFlow or Keras.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from trainer.promote.policy import Policy

DIGITS = range(10)
ACCURACY_SLACK = 1e-9  # accuracies are float fractions; equal must compare equal after subtraction


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    record: dict  # the numbers behind the decision, for version.json and --list


def paired(right_new: np.ndarray, right_old: np.ndarray, margin: float = 0.0) -> dict:
    """McNemar's exact test on two boolean "was it right" vectors over the same images.

    p_worse: the chance of a split this lopsided if the new model were worse by only `margin` (a
    fraction of the images): conditional on the n discordant images, each is the current model's
    with chance 1/2 + margin * images / (2 n) (the discordant rate estimated from the data; with
    margin 0 this is McNemar's exact test). p_better: the same for "better", with no margin."""
    new_only = int(np.sum(right_new & ~right_old))
    old_only = int(np.sum(right_old & ~right_new))
    n = new_only + old_only
    share = 0.5 + margin * len(right_new) / (2 * n) if n else 1.0
    worse = binomtest(old_only, n, share, alternative="greater").pvalue if share < 1 else 1.0
    better = binomtest(new_only, n, 0.5, alternative="greater").pvalue if n else 1.0
    return {"new_only": new_only, "old_only": old_only, "p_worse": float(worse), "p_better": float(better)}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error at most alpha for any dependence)."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def compare(y_true: np.ndarray, old_pred: np.ndarray | None, new_pred: np.ndarray, policy: Policy) -> Decision:
    """Promote the candidate (`new_pred`, predicted digits) over the current model (`old_pred`;
    None when the store has none yet)? Floor first, then significantly worse overall, then per digit."""
    y_true, new_pred = np.asarray(y_true), np.asarray(new_pred)
    right_new = new_pred == y_true
    accuracy = float(right_new.mean())
    record = {"alpha": policy.alpha, "margin": policy.margin, "digit_margin": policy.digit_margin,
              "require_improvement": policy.require_improvement, "min_accuracy": policy.min_accuracy, "test_images": int(len(y_true)), "accuracy": accuracy}
    if accuracy + ACCURACY_SLACK < policy.min_accuracy:
        return Decision(False, f"test accuracy {accuracy:.4f} is below the floor {policy.min_accuracy:.4f} "
                        "(--min-accuracy)", record)
    if old_pred is None:
        return Decision(True, f"test accuracy {accuracy:.4f} >= floor {policy.min_accuracy:.4f}; "
                        "there was no current model", record)
    right_old = np.asarray(old_pred) == y_true
    overall = paired(right_new, right_old, policy.margin)
    digits = {str(d): {**paired(right_new[y_true == d], right_old[y_true == d], policy.digit_margin),
                       "recall_old": _mean(right_old[y_true == d]), "recall_new": _mean(right_new[y_true == d])}
              for d in DIGITS}
    for d, p in zip(digits, holm([digits[d]["p_worse"] for d in digits])):
        digits[d]["p_worse_holm"] = p
    drop = max(digits, key=lambda d: digits[d]["recall_old"] - digits[d]["recall_new"])
    record.update(baseline_accuracy=float(right_old.mean()), overall=overall, digits=digits,
                  largest_digit_drop={"digit": int(drop), "recall_old": digits[drop]["recall_old"],
                                      "recall_new": digits[drop]["recall_new"],
                                      "p_holm": digits[drop]["p_worse_holm"]})
    versus = (f"test accuracy {record['baseline_accuracy']:.4f} -> {accuracy:.4f} "
              f"({overall['new_only']} images only the new model gets right, {overall['old_only']} only the current")
    share = policy.alpha / 2  # half for the overall test, half for the digits' family: <= alpha in all
    worse = [f"digit {d}: recall {s['recall_old']:.4f} -> {s['recall_new']:.4f} (p = {s['p_worse_holm']:.2g})"
             for d, s in digits.items() if s["p_worse_holm"] < share]
    if overall["p_worse"] < share:
        worse.insert(0, f"significantly worse overall: {versus}; p = {overall['p_worse']:.2g})")
    if worse:
        worse[-1] += (f" (tested against margins of {policy.margin * 100:g} points overall and "
                      f"{policy.digit_margin * 100:g} a digit, alpha {policy.alpha})")
    if worse:
        return Decision(False, "; ".join(worse), record)
    if policy.require_improvement and overall["p_better"] >= policy.alpha:
        return Decision(False, f"not significantly better (--require-improvement): {versus}; "
                        f"p = {overall['p_better']:.2g})", record)
    better = overall["p_better"] < policy.alpha
    return Decision(True, f"{'significantly better' if better else 'not significantly worse'}: {versus}; "
                    f"p = {overall['p_better' if better else 'p_worse']:.2g}), no digit significantly worse",
                    record)


def summary(record: dict) -> tuple[str, str]:
    """(discordant counts and p, the largest per-digit drop) for --list; '-' where a record has none
    (a first version, or one written before this gate: it kept only the accuracies)."""
    overall, drop = record.get("overall"), record.get("largest_digit_drop")
    versus = f"+{overall['new_only']}/-{overall['old_only']} p={overall['p_worse']:.2g}" if overall else "-"
    if not drop:
        return versus, "-"
    fall = drop["recall_old"] - drop["recall_new"]
    return versus, f"{drop['digit']}: -{fall:.4f}" if fall > 0 else "none"


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else 1.0
