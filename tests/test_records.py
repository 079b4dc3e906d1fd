"""The typed records between stages: each reads and writes its own JSON with a schema, is frozen,
and loads the files written before the schema field existed (tests/data/old_format: a version.json,
metrics.json and manifest.json written by the code before the records, in a real retraining cycle
on the committed sample). No Ray."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from tests.conftest import ROOT
from trainer.config import Config
from trainer.data import shards
from trainer.data.manifest import Manifest
from trainer.promote.retrain import format_table
from trainer.store.model_store import Store, StoreError
from trainer.store.record import SCHEMA as VERSION_SCHEMA, VersionRecord
from trainer.store.versions import PASSED, status_of
from trainer.train.loop_config import LoopConfig
from trainer.train.result import SCHEMA as RUN_SCHEMA, RunMetrics

OLD = ROOT / "tests" / "data" / "old_format"


def old(name: str) -> dict:
    return json.loads((OLD / name).read_text())


def test_an_old_version_record_loads_and_writes_back_the_same_fields():
    raw = old("version.json")
    assert "schema" not in raw
    record = VersionRecord.from_json(raw)
    assert record.version == raw["version"] and record.decision == PASSED
    assert record.test_accuracy == raw["test_accuracy"] and record.gate == raw["gate"]
    assert record.data["content_sha256"] == raw["data"]["content_sha256"] and record.extra == {}
    written = record.to_json()
    assert written.pop("schema") == VERSION_SCHEMA and written == raw
    assert VersionRecord.from_json(record.to_json()) == record


def test_a_store_written_before_the_records_still_lists_and_rolls_back(tmp_path, capsys):
    raw = old("version.json")
    store = Store(str(tmp_path / "store"))
    store.create()
    folder = tmp_path / "store" / "versions" / raw["version"]
    folder.mkdir()
    shutil.copy(OLD / "version.json", folder)
    shutil.copy(OLD / "metrics.json", folder)
    (tmp_path / "store" / "current.json").write_text(json.dumps({"version": raw["version"], "history": []}))
    (record,) = store.records()
    assert status_of(record, store.pointer()) == "current"
    table = format_table([(record, "current")])
    assert raw["version"] in table and f"{raw['test_accuracy']:.4f}" in table
    assert RunMetrics.read(str(folder / "metrics.json")).test_accuracy == raw["test_accuracy"]


def test_an_old_run_metrics_file_loads_and_writes_back_the_same_fields(tmp_path):
    raw = old("metrics.json")
    assert "schema" not in raw
    metrics = RunMetrics.read(str(OLD / "metrics.json"))
    assert metrics.test_accuracy == raw["test_accuracy"] and metrics.epochs == raw["epochs"]
    assert metrics.timeline == raw["timeline"] and metrics.extra == {}
    written = metrics.to_json()
    assert written.pop("schema") == RUN_SCHEMA and written == raw
    metrics.write(str(tmp_path / "metrics.json"))
    assert RunMetrics.read(str(tmp_path / "metrics.json")) == metrics
    assert RunMetrics.read(str(tmp_path / "missing.json")) is None


def test_an_old_manifest_loads_and_writes_back_byte_for_byte_the_same_document():
    raw = old("manifest.json")
    manifest = Manifest.from_json(raw)
    assert manifest.to_json() == raw  # the format field was the schema from the start
    assert manifest.rows("train") == sum(f["rows"] for f in manifest.files("train")) == 3000


def test_the_manifest_a_parquet_directory_carries_reads_back_as_written(tmp_path):
    written = shards.write_parquet(shards.load(str(ROOT / "tests" / "data" / "mnist_sample.npz")),
                                   str(tmp_path / "pq"))
    assert shards.read_manifest(str(tmp_path / "pq")) == written
    assert written.to_json() == old("manifest.json")  # the same content: the same manifest


def test_records_are_frozen_and_move_on_by_new_records():
    record = VersionRecord("20261205T000000Z-abcdef", decision=PASSED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.decision = "rejected"
    later = record.advance(reason="because")
    assert record.reason is None and later.reason == "because" and later.decision == PASSED
    metrics = RunMetrics.from_json(old("metrics.json"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.test_accuracy = 1.0
    assert metrics.complete(wall_seconds=1.0).wall_seconds == 1.0 != metrics.wall_seconds


def test_a_record_of_an_unknown_schema_or_shape_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="schema 'mnist-version/9'"):
        VersionRecord.from_json({**old("version.json"), "schema": "mnist-version/9"})
    with pytest.raises(ValueError, match="schema 'mnist-run/9'"):
        RunMetrics.from_json({**old("metrics.json"), "schema": "mnist-run/9"})
    with pytest.raises(ValueError, match="format 'mnist-parquet/9'"):
        Manifest.from_json({**old("manifest.json"), "format": "mnist-parquet/9"})
    store = Store(str(tmp_path / "store"))
    store.create()
    vid = old("version.json")["version"]
    (tmp_path / "store" / "versions" / vid).mkdir()
    (tmp_path / "store" / "versions" / vid / "version.json").write_text(json.dumps({"no": "version"}))
    with pytest.raises(StoreError, match="not a version record"):
        store.record(vid)


def test_keys_another_tool_added_are_kept():
    raw = {**old("version.json"), "reviewed_by": "alice"}
    record = VersionRecord.from_json(raw)
    assert record.extra == {"reviewed_by": "alice"} and record.to_json()["reviewed_by"] == "alice"


def test_the_loop_config_crosses_as_a_plain_dict_and_back():
    loop = LoopConfig(Config(epochs=3, num_workers=(1, 2)), train_rows=3000, launch="abc12345",
                      stream={"path": "/data", "files": [{"path": "train/part-00000.parquet", "rows": 3000}]})
    plain = loop.to_dict()
    assert isinstance(plain["config"], dict) and plain["train_rows"] == 3000
    assert LoopConfig.from_dict(plain) == loop == LoopConfig.from_dict(json.loads(json.dumps(plain)))
