"""The retraining policy: the promotion settings and what a model is a function of. Pure; nothing
here touches the disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from trainer.common.cli import option
from trainer.common.errors import UsageError
from trainer.config import RESULT, WEIGHTS, default_of, fields_shaping

# What a model learns from, besides the data's content: the fields marked so in Config. Where and
# how a run executes (paths, the cluster, logging, the source's path) is no reason to retrain.
LEARNED_FROM = fields_shaping(WEIGHTS, RESULT)


@dataclass(frozen=True)
class Policy:
    """What a cycle promotes (trainer/promote/gate.py reads the first three) and how many versions it keeps."""
    # alpha: at most this chance of rejecting a model within the margins (overall and digits together)
    alpha: float = option(0.05, "reject a model significantly worse than the current one at this level "
                          "(McNemar's exact test on the same test images, overall and per digit)")
    margin: float = option(0.002, "reject only a model significantly worse than the current one by more than "
                           "this much accuracy (0.002: 0.2 points; 0 tests for any drop)")
    # 2 points of one digit's recall: the recipe's run-to-run spread
    digit_margin: float = option(0.02, "the same for one digit's recall")
    require_improvement: bool = option(False, "promote only a model significantly better than the current one")
    min_accuracy: float = option(0.97, "never promote below this test accuracy")  # whatever the current model scores
    keep_versions: int = option(10, "keep this many versions (the current one always), prune older ones")

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise UsageError(f"alpha must lie strictly between 0 and 1, got {self.alpha}")
        for name in ("margin", "digit_margin"):
            if not 0 <= getattr(self, name) < 0.5:
                raise UsageError(f"{name} must lie in 0..0.5 (a fraction of the images), got {getattr(self, name)}")
        if not 0 <= self.min_accuracy <= 1:
            raise UsageError(f"min_accuracy must lie in 0..1, got {self.min_accuracy}")
        if self.keep_versions < 1:
            raise UsageError(f"keep_versions must be at least 1, got {self.keep_versions}")


def fingerprint(config: dict, data_sha256: str) -> dict:
    """What a model is a function of: the data's content and the recipe (not where it ran)."""
    # A field the record predates held its default then (hidden_units, dropout: 512 and none).
    recipe = json.loads(json.dumps({k: config.get(k, default_of(k)) for k in sorted(LEARNED_FROM)}))
    return {"data_sha256": data_sha256, "config": recipe}  # as JSON holds it: a (MIN, MAX) tuple is a list

