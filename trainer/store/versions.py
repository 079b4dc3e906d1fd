"""A version's identity and fate: its id, the decision fixed at its birth, and its status against
the store's pointer. Pure; nothing here touches the disk."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

from trainer.common.clock import utc_now

# A version's decision, fixed at birth: passed the gate; rejected by the gate or the canary; failed
# to train; refused to train on its data (trainer/data/checks.py).
PASSED, REJECTED, FAILED, REFUSED = "passed", "rejected", "failed", "refused"
NO_MODEL = (FAILED, REFUSED)
VERSION_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_version_id(now: datetime | None = None) -> str:
    return f"{(now or utc_now()).astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def status_of(record, pointer: dict | None) -> str:
    """A VersionRecord's status: current, promoted earlier, rejected, failed, refused, or not promoted
    (passed, then a crash)."""
    vid = record.version
    if pointer and pointer.get("version") == vid:
        return "current"
    if record.decision in (REJECTED, *NO_MODEL):
        return record.decision
    if any(entry.get("version") == vid for entry in (pointer or {}).get("history", [])):
        return "promoted earlier"
    return "not promoted"
