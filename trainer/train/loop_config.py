"""What the driver hands every worker: Ray Train's `train_loop_config`, which crosses the Ray
boundary as a plain dict (`to_dict` on the driver, `from_dict` on the worker)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainer.config import Config


@dataclass(frozen=True)
class LoopConfig:
    config: Config
    train_rows: int  # the training split's rows: the workers check their shares cover it
    launch: str  # this launch of Ray Train (a restart within it keeps its first step's time)
    init: dict | None = None  # --init-from: {"weights", "slots"} as numpy arrays (trainer/train/warm.py)
    stream: dict | None = None  # the streaming path: {"path", "files"} of the Parquet split; else Ray Data's shard
    validation: str | None = None  # a search's trial: the derived data set whose held-out rows score each epoch
    pin: bool = False  # each worker on cores of its own (--pin-cpus, decided where the driver knows the Ray)

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> LoopConfig:
        return cls(**{**values, "config": Config.from_dict(values["config"])})
