"""What the promotion gate (trainer/promote/gate.py) decides on simulated pairs of models: how often it rejects
an equally good model (false rejections), and how often it catches a worse one (power).

    python scripts/gate_power.py                 # 2,000 trials a scenario, about 25 s
    python scripts/gate_power.py --trials 200
    python scripts/gate_power.py --models a/mnist.keras b/mnist.keras c/mnist.keras --data ../shared/data/mnist
                                                 # real models: the gate on every ordered pair

Each trial scores two models on MNIST's 10,000 test images (1,000 a digit). Each model's recall of
each digit is the recipe's (0.98) plus its seed's deviation (SEED_SD a digit and OVERALL_SD in
all, as measured across four full-MNIST runs); its right or wrong answers are Bernoulli draws, and the two models agree on an
image with the chance `agree` (else the new one draws afresh): at agree = 0.7 about 1.2% of the
images are discordant, as between two default full-MNIST runs here (103-163 of 10,000).
tests/test_gate.py runs the same scenarios with fewer trials and asserts the bounds.
"""

from __future__ import annotations

import sys

import numpy as np

from trainer.common.cli import script_parser
from trainer.promote.gate import compare
from trainer.promote.policy import Policy

LABELS = np.repeat(np.arange(10), 1000)
ACCURACY = 0.98  # the default recipe's
SEED_SD = 0.006  # a digit's recall across seeds of one recipe (sd; four full-MNIST runs: 0.1-1.2 points, mean 0.6)
OVERALL_SD = 0.0013  # their accuracy across the same seeds (0.9774-0.9806): less than SEED_SD / sqrt(10), as
# a seed that does better on one digit does worse on others; the digits' deviations are drawn so
TRADE = 1 - OVERALL_SD / (SEED_SD / np.sqrt(10))  # (each less this share of their mean)
SCENARIOS = {  # name: (the new model's accuracy, {digit: its recall}, agree, seed spread)
    "equally good": (ACCURACY, {}, 0.7, SEED_SD),
    "equally good, less alike": (ACCURACY, {}, 0.5, SEED_SD),
    "equally good, no seed spread": (ACCURACY, {}, 0.7, 0.0),
    "0.5 points worse overall": (ACCURACY - 0.005, {}, 0.7, SEED_SD),
    "1 point worse overall": (ACCURACY - 0.01, {}, 0.7, SEED_SD),
    "3 points worse on digit 7": (ACCURACY, {7: ACCURACY - 0.03}, 0.7, SEED_SD),
    "5 points worse on digit 7": (ACCURACY, {7: ACCURACY - 0.05}, 0.7, SEED_SD),
}


def draw(rng: np.random.Generator, old_right: np.ndarray, old: float, new: float, agree: float) -> np.ndarray:
    """The new model's right answers: old's where they agree, else a fresh draw, so that the new
    model is right with chance `new` where the old one is right with chance `old`."""
    fresh = rng.random(len(old_right)) < np.clip((new - agree * old) / (1 - agree), 0, 1)
    return np.where(rng.random(len(old_right)) < agree, old_right, fresh)


def trial(rng: np.random.Generator, accuracy: float, digits: dict, agree: float, seed_sd: float,
          policy: Policy) -> bool:
    """One simulated comparison; True when the gate rejects the new model. Each model's recall of
    each digit is the recipe's plus its own seed's deviation."""
    old_right, new_right = np.zeros(len(LABELS), bool), np.zeros(len(LABELS), bool)
    old_seed, new_seed = (z - TRADE * z.mean() for z in rng.normal(0, seed_sd, (2, 10)))
    for digit in range(10):
        mask = LABELS == digit
        old = min(ACCURACY + old_seed[digit], 1.0)
        new = min(digits.get(digit, accuracy) + new_seed[digit], 1.0)
        old_right[mask] = rng.random(mask.sum()) < old
        new_right[mask] = draw(rng, old_right[mask], old, new, agree)
    wrong = (LABELS + 1) % 10
    decision = compare(LABELS, np.where(old_right, LABELS, wrong), np.where(new_right, LABELS, wrong), policy)
    return not decision.promote


def rejection_rate(scenario: str, trials: int, seed: int = 0, policy: Policy = Policy(min_accuracy=0)) -> float:
    accuracy, digits, agree, seed_sd = SCENARIOS[scenario]
    rng = np.random.default_rng(seed)
    return sum(trial(rng, accuracy, digits, agree, seed_sd, policy) for _ in range(trials)) / trials


def real_pairs(paths: list[str], data: str | None, policy: Policy) -> None:
    """The gate on every ordered pair of trained models (current, candidate), on one test split."""
    from trainer.common import quiet
    from trainer.data import shards as data_module

    quiet.import_tensorflow()
    import keras

    from trainer.model.network import evaluate

    mnist = data_module.load(data_module.resolve_source(data))
    predicted = {p: evaluate(keras.saving.load_model(p), mnist.x_test, mnist.y_test)[2].argmax(axis=1) for p in paths}
    rejected = 0
    for old in paths:
        for new in paths:
            if old != new:
                decision = compare(mnist.y_test, predicted[old], predicted[new], policy)
                rejected += not decision.promote
                print(f"{old} -> {new}: {'promote' if decision.promote else 'REJECT'}: {decision.reason}")
    pairs = len(paths) * (len(paths) - 1)
    print(f"{rejected} of {pairs} ordered pairs rejected")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=Policy.alpha)
    parser.add_argument("--margin", type=float, default=Policy.margin)
    parser.add_argument("--digit-margin", type=float, default=Policy.digit_margin)
    parser.add_argument("--models", nargs="+", metavar="MODEL", help="trained models to compare instead")
    parser.add_argument("--data", help="where MNIST is, for --models (default: download)")
    args = parser.parse_args(argv)
    policy = Policy(alpha=args.alpha, margin=args.margin, digit_margin=args.digit_margin, min_accuracy=0)
    if args.models:
        real_pairs(args.models, args.data, policy)
        return 0
    print(f"alpha {args.alpha}, margins {args.margin} overall and {args.digit_margin} a digit; {args.trials} "
          "trials a scenario, 10,000 test images")
    for name in SCENARIOS:
        rate = rejection_rate(name, args.trials, policy=policy)
        what = "false rejections" if name.startswith("equally") else "power (rejected)"
        print(f"{name:>30}: {what} {rate:.1%} (+- {1.96 * (rate * (1 - rate) / args.trials) ** 0.5:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
