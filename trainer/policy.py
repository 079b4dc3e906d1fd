"""The retraining policy: version ids, the promotion gate, what a model is a function of, and a
version's status. Pure functions; nothing here touches the disk.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime, timezone

from trainer.config import RESULT, WEIGHTS, fields_shaping

PASSED, REJECTED, FAILED = "passed", "rejected", "failed"  # a version's gate decision, fixed at birth
VERSION_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
ACCURACY_SLACK = 1e-9  # accuracies are float32 fractions; equal must compare equal after subtraction
# What a model learns from, besides the data's content: the fields marked so in Config. Where and
# how a run executes (paths, the cluster, logging, the source's path) is no reason to retrain.
LEARNED_FROM = fields_shaping(WEIGHTS, RESULT)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_version_id(now: datetime | None = None) -> str:
    return f"{(now or utc_now()).astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def gate(accuracy: float, baseline: float | None, tolerance: float,
         min_accuracy: float) -> tuple[bool, str]:
    """(promote?, why): at least the floor, and at least the current model's accuracy - tolerance."""
    if accuracy + ACCURACY_SLACK < min_accuracy:
        return False, f"test accuracy {accuracy:.4f} is below the floor {min_accuracy:.4f} (--min-accuracy)"
    if baseline is None:
        return True, f"test accuracy {accuracy:.4f} >= floor {min_accuracy:.4f}; there was no current model"
    if accuracy + ACCURACY_SLACK < baseline - tolerance:
        return False, (f"test accuracy {accuracy:.4f} is more than {tolerance:.4f} (--tolerance) below "
                       f"the current model's {baseline:.4f}")
    return True, (f"test accuracy {accuracy:.4f} >= current {baseline:.4f} - {tolerance:.4f} "
                  f"and >= floor {min_accuracy:.4f}")


def fingerprint(config: dict, data_sha256: str) -> dict:
    """What a model is a function of: the data's content and the recipe (not where it ran)."""
    recipe = json.loads(json.dumps({k: v for k, v in sorted(config.items()) if k in LEARNED_FROM}))
    return {"data_sha256": data_sha256, "config": recipe}  # as JSON holds it: a (MIN, MAX) tuple is a list


def status_of(record: dict, pointer: dict | None) -> str:
    """current, promoted earlier, rejected, failed, or not promoted (passed, then a crash)."""
    vid = record.get("version")
    if pointer and pointer.get("version") == vid:
        return "current"
    if record.get("decision") in (REJECTED, FAILED):
        return record["decision"]
    if any(entry.get("version") == vid for entry in (pointer or {}).get("history", [])):
        return "promoted earlier"
    return "not promoted"


