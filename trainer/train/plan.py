"""What a run settles before Ray starts (trainer/train/driver.py's prepare): where it lives, its data,
the places it writes, and the --init-from weights."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.common import fs
from trainer.data.manifest import Manifest

DATA_DIR = "_prepared_data"  # under the storage path, beside the runs


PUBLISHED = "model"  # <storage>/<run>/model/: the final outputs, where a submitted job's user finds them


@dataclass(frozen=True)
class Plan:
    """What prepare() settles before Ray starts: where the run lives, its data (checked), the places
    it writes (checked), and the --init-from weights."""
    storage_path: str
    run_name: str
    parquet_dir: str
    test: tuple  # (images, labels) of the test split: all the rows the driver holds
    manifest: Manifest
    streaming: bool  # the workers stream the training rows (--data-path)
    places: dict  # "output" and "storage": fs.Place, or None for an object store's URI
    start: object = None  # trainer.train.warm's weights for --init-from, if given

    @property
    def run_dir(self) -> str:
        return fs.join(self.storage_path, self.run_name)

    @property
    def train_rows(self) -> int:
        return self.manifest.rows("train")
