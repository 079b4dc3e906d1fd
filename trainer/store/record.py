"""A version's record, `version.json`: what was trained, from what, and what the cycle decided.

Built by the retraining cycle (trainer/promote/cycle.py), once a step is done with `advance`;
written once by the store when the version is registered, and never changed after. Records written
before the schema field existed (schema 1) still load: their fields are the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trainer.common import records

SCHEMA = "mnist-version/2"
SCHEMAS = (None, "mnist-version/1", SCHEMA)  # None: written before records said their schema
# Fields a step adds only when it ran (the test metrics and the MLflow run, even if none, once
# trained; the gate once it judged; the canary once the gate passed): left out until then, as always.
LATER = ("test_accuracy", "test_loss", "gate", "canary")


@dataclass(frozen=True)
class VersionRecord:
    version: str
    parent: str | None = None  # the version it started from (--warm-start, --init-from store:...)
    started: str | None = None  # UTC, ISO 8601
    git_commit: str | None = None
    host: str | None = None
    config: dict = field(default_factory=dict)  # the run's Config, as metrics.json holds it
    data: dict = field(default_factory=dict)  # content_sha256, path, source, train_rows, test_rows, profile
    data_checks: dict | None = None  # trainer/promote/promotion.py's check_data
    test_accuracy: float | None = None
    test_loss: float | None = None
    tracking: dict | None = None  # the MLflow run (trainer/track/run.py's Run.describe)
    decision: str | None = None  # trainer/store/versions.py: passed, rejected, failed, refused
    reason: str | None = None
    gate: dict | None = None  # trainer/promote/gate.py's record, with the baseline version
    canary: dict | None = None  # trainer/promote/canary.py's figures, or {"error": ...}
    finished: str | None = None
    extra: dict = field(default_factory=dict)  # keys this schema does not name (another tool's): kept as is

    def advance(self, **changes) -> VersionRecord:
        """This record with a later step's fields filled in (a new record: this one is unchanged)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return records.dump(self, SCHEMA, {
            k: v for k, v in records.fields_of(self).items()
            if v is not None or not (k in LATER or (k == "tracking" and self.test_accuracy is None))})

    @classmethod
    def from_json(cls, value) -> VersionRecord:
        """A record from version.json's content; ValueError if it is not one."""
        if not isinstance(value, dict) or not isinstance(value.get("version"), str):
            raise ValueError("not a version record (no version id)")
        return records.load(cls, value, SCHEMAS, "a version record")
