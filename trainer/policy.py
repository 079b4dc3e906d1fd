"""The retraining policy: the promotion settings, version ids, what a model is a function of, and
a version's status. Pure; nothing here touches the disk.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from trainer.config import RESULT, WEIGHTS, fields_shaping

# A version's decision, fixed at birth: passed the gate; rejected by the gate or the canary; failed
# to train; refused to train on its data (trainer/data_checks.py).
PASSED, REJECTED, FAILED, REFUSED = "passed", "rejected", "failed", "refused"
NO_MODEL = (FAILED, REFUSED)
VERSION_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
# What a model learns from, besides the data's content: the fields marked so in Config. Where and
# how a run executes (paths, the cluster, logging, the source's path) is no reason to retrain.
LEARNED_FROM = fields_shaping(WEIGHTS, RESULT)


@dataclass(frozen=True)
class Policy:
    """What a cycle promotes (trainer/gate.py reads the first three) and how many versions it keeps."""
    alpha: float = 0.05  # at most this chance of rejecting a model within the margins (overall and digits together)
    margin: float = 0.002  # reject only a model significantly worse than this (0.2 points of accuracy) ...
    digit_margin: float = 0.02  # ... or than 2 points of one digit's recall: the recipe's run-to-run spread
    require_improvement: bool = False  # promote only a model significantly better than the current one
    min_accuracy: float = 0.97  # the floor, whatever the current model scores
    keep_versions: int = 10

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {self.alpha}")
        for name in ("margin", "digit_margin"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must lie in 0..0.5 (a fraction of the images), got {getattr(self, name)}")
        if not 0 <= self.min_accuracy <= 1:
            raise ValueError(f"min_accuracy must lie in 0..1, got {self.min_accuracy}")
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {self.keep_versions}")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_version_id(now: datetime | None = None) -> str:
    return f"{(now or utc_now()).astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def fingerprint(config: dict, data_sha256: str) -> dict:
    """What a model is a function of: the data's content and the recipe (not where it ran)."""
    recipe = json.loads(json.dumps({k: v for k, v in sorted(config.items()) if k in LEARNED_FROM}))
    return {"data_sha256": data_sha256, "config": recipe}  # as JSON holds it: a (MIN, MAX) tuple is a list


def status_of(record: dict, pointer: dict | None) -> str:
    """current, promoted earlier, rejected, failed, refused, or not promoted (passed, then a crash)."""
    vid = record.get("version")
    if pointer and pointer.get("version") == vid:
        return "current"
    if record.get("decision") in (REJECTED, *NO_MODEL):
        return record["decision"]
    if any(entry.get("version") == vid for entry in (pointer or {}).get("history", [])):
        return "promoted earlier"
    return "not promoted"


