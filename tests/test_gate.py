"""The promotion gate (trainer/promote/gate.py) on simulated and constructed paired outcomes: no Ray, no TensorFlow.

The simulation is scripts/gate_power.py's (the script prints the same figures with more trials).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import ROOT
from trainer.promote.gate import compare, holm, paired, summary
from trainer.promote.policy import Policy

spec = importlib.util.spec_from_file_location("gate_power", ROOT / "scripts" / "gate_power.py")
gate_power = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate_power)
LABELS = gate_power.LABELS
TRIALS = 400  # a scenario: about 1 s each; the bounds below hold with room at any seed


@pytest.mark.parametrize("scenario, bound", [
    ("equally good", 0.06),  # this test's 400 trials gave 3.5%; scripts/gate_power.py's figure is in docs/operations.md
    ("equally good, less alike", 0.05),  # 1.5%
    ("equally good, no seed spread", 0.05),  # 0%
])
def test_two_equally_good_models_are_rarely_rejected(scenario, bound):
    rate = gate_power.rejection_rate(scenario, TRIALS, seed=1)
    assert rate <= bound, f"{scenario}: {rate:.1%} of {TRIALS} rejected"


def test_without_margins_the_seed_spread_alone_gets_most_retrains_rejected():
    """Why the gate has margins: McNemar with none calls two seeds of one recipe different (as it
    did 9 times in 12 for real full-MNIST runs)."""
    rate = gate_power.rejection_rate("equally good", TRIALS // 2, seed=1, policy=Policy(margin=0, digit_margin=0,
                                                                                       min_accuracy=0))
    assert rate >= 0.4, f"{rate:.1%}"  # measured 66%


@pytest.mark.parametrize("scenario, bound", [
    ("1 point worse overall", 0.9),  # measured 99%
    ("5 points worse on digit 7", 0.85),  # 94.5%
    ("0.5 points worse overall", 0.4),  # 58%: within the seed spread, so often missed
    ("3 points worse on digit 7", 0.3),  # 48%: likewise
])
def test_a_worse_model_is_caught(scenario, bound):
    rate = gate_power.rejection_rate(scenario, TRIALS, seed=2)
    assert rate >= bound, f"{scenario}: only {rate:.1%} of {TRIALS} rejected"


def predictions(right: np.ndarray) -> np.ndarray:
    return np.where(right, LABELS, (LABELS + 1) % 10)


def test_a_drop_on_one_digit_is_rejected_and_named_though_the_mean_does_not_move():
    old = np.ones(len(LABELS), bool)
    old[::50] = False  # 98%
    new = old.copy()
    new[np.flatnonzero(LABELS == 7)[1:600:10]] = False  # 60 more sevens wrong: recall 0.98 -> 0.92
    new[np.flatnonzero(LABELS == 3)[::50]] = True  # 20 more threes right,
    new[np.flatnonzero(LABELS == 5)[::50]] = True  # 20 more fives,
    new[np.flatnonzero(LABELS == 8)[::50]] = True  # and 20 more eights: overall unchanged
    decision = compare(LABELS, predictions(old), predictions(new), Policy())
    assert not decision.promote
    assert decision.reason.startswith("digit 7: recall 0.9800 -> 0.9200 (p = ")
    assert decision.reason.endswith("(tested against margins of 0.2 points overall and 2 a digit, alpha 0.05)")
    assert "overall:" not in decision.reason and "\n" not in decision.reason
    record = decision.record
    assert record["overall"]["new_only"] == 60 and record["overall"]["old_only"] == 60
    assert record["largest_digit_drop"]["digit"] == 7 and record["digits"]["7"]["p_worse_holm"] < 0.025
    assert summary(record) == (f"+60/-60 p={record['overall']['p_worse']:.2g}", "7: -0.0600")
    assert not compare(LABELS, predictions(old), predictions(new), Policy(digit_margin=0.07)).reason.startswith("digit")


def test_identical_models_pass_and_a_significantly_better_one_says_so():
    old = np.ones(len(LABELS), bool)
    old[::50] = False
    same = compare(LABELS, predictions(old), predictions(old), Policy())
    assert same.promote and same.reason.startswith("not significantly worse: test accuracy 0.9800 -> 0.9800 (0 images")
    better = old.copy()
    better[::100] = True  # half the mistakes fixed
    decision = compare(LABELS, predictions(old), predictions(better), Policy())
    assert decision.promote and decision.reason.startswith("significantly better")
    assert summary(decision.record)[1] == "none"


def test_require_improvement_rejects_a_model_that_is_merely_as_good():
    old = np.ones(len(LABELS), bool)
    old[::50] = False
    new = np.roll(old, 1)  # as many mistakes, on other images
    decision = compare(LABELS, predictions(old), predictions(new), Policy(require_improvement=True))
    assert not decision.promote and decision.reason.startswith("not significantly better (--require-improvement)")
    assert compare(LABELS, predictions(old), predictions(new), Policy()).promote


def test_the_floor_holds_and_a_first_version_has_only_the_floor():
    right = np.ones(len(LABELS), bool)
    right[::20] = False  # 95%
    floor = compare(LABELS, None, predictions(right), Policy(min_accuracy=0.97))
    assert not floor.promote and "below the floor 0.9700 (--min-accuracy)" in floor.reason
    first = compare(LABELS, None, predictions(right), Policy(min_accuracy=0.9))
    assert first.promote and "there was no current model" in first.reason
    assert summary(first.record) == ("-", "-")


def test_paired_counts_only_the_discordant_images():
    new = np.array([1, 1, 0, 0, 1], bool)
    old = np.array([1, 0, 1, 0, 0], bool)
    result = paired(new, old)
    assert (result["new_only"], result["old_only"]) == (2, 1)
    assert result["p_worse"] == pytest.approx(0.875)  # P(X >= 1), X ~ Binomial(3, 1/2)
    assert result["p_better"] == pytest.approx(0.5)  # P(X >= 2)
    assert paired(old, old)["p_worse"] == 1.0
    # a margin of 0.1 (of 5 images) moves the null to 1/2 + 0.1 * 5 / 6 = 7/12 for the current model
    assert paired(new, old, margin=0.1)["p_worse"] == pytest.approx(1 - (5 / 12) ** 3)
    assert paired(new, old, margin=0.6)["p_worse"] == 1.0  # a margin the 3 discordant images cannot show


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_an_old_record_summarises_as_dashes():
    old = {"tolerance": 0.002, "min_accuracy": 0.97, "baseline_version": None, "baseline_accuracy": None}
    assert summary(old) == ("-", "-")


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5])
def test_alpha_must_lie_strictly_between_0_and_1(alpha):
    with pytest.raises(ValueError, match=r"alpha must lie strictly between 0 and 1, got "):
        Policy(alpha=alpha)


@pytest.mark.parametrize("field", ["margin", "digit_margin"])
def test_a_margin_is_a_fraction_under_one_half(field):
    with pytest.raises(ValueError, match=rf"{field} must lie in 0\.\.0\.5 \(a fraction of the images\), got 2"):
        Policy(**{field: 2})
