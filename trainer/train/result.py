"""What a finished run gives the stages after it, and writes as `metrics.json`: the test metrics,
every epoch's record, where the data and the run live, the restarts and resizes, the outputs' reports
and the timeline.

Built by the driver in two steps, each a new record: `evaluate` fills what the checkpoint and the
test split say, `publish` what writing the outputs adds (`complete`). Read back with `read`, which
also takes files written before the schema field existed (schema 1: the same fields).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trainer.common import fs, records
from trainer.common.atomic import write_json_atomic

SCHEMA = "mnist-run/2"
SCHEMAS = (None, "mnist-run/1", SCHEMA)  # None: written before metrics.json said its schema
OPTIONAL = ("savedmodel",)  # written only when there is one (--export-savedmodel)


@dataclass(frozen=True)
class RunMetrics:
    test_accuracy: float
    test_loss: float
    num_workers: int | list
    epochs: list[dict]  # one record an epoch (trainer/train/worker.py): loss, accuracy, world_size, seconds...
    config: dict  # Config.to_dict()
    workers: list[dict] = field(default_factory=list)  # each rank's shard and host
    init: dict | None = None  # --init-from's model (trainer/train/warm.py)
    world_sizes: list = field(default_factory=list)
    resizes: list[dict] = field(default_factory=list)  # trainer/train/elastic.py
    data: dict = field(default_factory=dict)  # path, content_sha256, train_rows, streamed
    run: dict = field(default_factory=dict)  # name, storage_path, checkpoint
    restarts: list[dict] = field(default_factory=list)  # trainer/train/failures.py's records
    tracking: dict | None = None  # the MLflow run (trainer/track/run.py's Run.describe)
    savedmodel: dict | None = None
    report: dict | None = None  # trainer/model/report.py's per-class metrics and plot files
    timeline: dict = field(default_factory=dict)  # trainer/common/timeline.py: seconds since the driver started
    wall_seconds: float | None = None
    driver_peak_rss_mb: float | None = None
    extra: dict = field(default_factory=dict)  # keys this schema does not name (another tool's): kept as is

    def complete(self, **changes) -> RunMetrics:
        """This record with a later step's fields filled in (a new record: this one is unchanged)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return records.dump(self, SCHEMA, {k: v for k, v in records.fields_of(self).items()
                                           if not (k in OPTIONAL and v is None)})

    @classmethod
    def from_json(cls, value) -> RunMetrics:
        """A record from metrics.json's content; ValueError if it is not one."""
        if not isinstance(value, dict) or "test_accuracy" not in value or "epochs" not in value:
            raise ValueError("not a run's metrics (no test_accuracy or epochs)")
        return records.load(cls, value, SCHEMAS, "run metrics")

    def write(self, path: str) -> None:
        """metrics.json, atomically (a temp name, then a rename)."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def read(cls, path: str) -> RunMetrics | None:
        """The record at `path` (local or a pyarrow URI), or None if there is none or it is unreadable."""
        value = fs.read_json(path)
        return None if value is None else cls.from_json(value)
