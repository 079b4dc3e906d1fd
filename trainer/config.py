"""The job's one config object: every setting, each default defined once, validated on creation.

The CLI is generated from these fields (trainer/cli.py); the config crosses the Ray boundary
as a plain dict (`dataclasses.asdict(cfg)` on the driver, `Config(**d)` on the worker).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODELS = ("mlp", "cnn")
PLACEMENTS = ("PACK", "SPREAD")


def _opt(default, help, **extra):
    """A dataclass field that carries its CLI help (and optional choices/flag name)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Config:
    # Data and outputs.
    data: str | None = _opt(
        None, "MNIST source: a Keras .npz, a directory of IDX files (.gz or raw), or a Parquet "
        "directory this project wrote. Default: $MNIST_DATA, else keras.datasets download.")
    output: str = _opt("models", "directory for mnist.keras, mnist.h5 and metrics.json")
    storage_path: str | None = _opt(
        None, "where Ray Train keeps checkpoints and prepared Parquet data "
        "(default: <output>/ray_results)")
    run_name: str | None = _opt(None, "Ray Train run name; reuse it to resume (default: a timestamp)")
    # The recipe (the classic Keras MNIST tutorial).
    model: str = _opt("mlp", "mlp: Dense(512)+Dense(10) (tutorial); cnn: small convnet", choices=MODELS)
    epochs: int = _opt(5, "training epochs")
    batch_size: int = _opt(128, "global batch size, split evenly across workers")
    learning_rate: float = _opt(0.001, "RMSprop learning rate")
    seed: int = _opt(0, "seed for weight init and shuffling")
    # Cluster.
    num_workers: int = _opt(2, "Ray Train workers (one model replica each)")
    cpus_per_worker: int = _opt(1, "CPUs reserved per worker; also TensorFlow's thread count")
    use_gpu: bool = _opt(False, "one GPU per worker")
    address: str | None = _opt(
        None, "Ray cluster to join ('auto' or host:port). Default: $RAY_ADDRESS, else a local Ray")
    local_cpus: int | None = _opt(
        None, "logical CPUs of the local Ray (default: this machine's cores + 1 for Ray Data)")
    # Fault tolerance.
    max_failures: int = _opt(0, "worker-group restarts Ray Train may make (FailureConfig)")
    keep_checkpoints: int = _opt(2, "newest checkpoints to keep (CheckpointConfig)")
    collective_timeout_s: float = _opt(
        300.0, "seconds a collective may wait for a peer before failing (no hang on a dead worker)")
    # Speed.
    steps_per_call: int = _opt(20, "training steps per tf.function call (fewer Python round trips)")

    def __post_init__(self):
        problems = list(_problems(self))
        if problems:
            raise ValueError(problems[0])

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.num_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)


def _problems(cfg: Config):
    """Yield one sentence per invalid setting, in field order."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str,
                    "int | None": (int, type(None)), "str | None": (str, type(None))}.get(str(f.type))
        if expected and (not isinstance(value, expected) or
                         (expected is not bool and isinstance(value, bool))):
            yield f"{f.name} must be a {f.type}, got {value!r}"
            return
    if cfg.epochs < 1:
        yield f"epochs must be at least 1, got {cfg.epochs}"
    if cfg.num_workers < 1:
        yield f"num_workers must be at least 1, got {cfg.num_workers}"
    elif cfg.batch_size < cfg.num_workers:
        yield (f"batch_size {cfg.batch_size} is smaller than num_workers {cfg.num_workers}: "
               "every worker needs at least one example per step")
    elif cfg.batch_size % cfg.num_workers:
        yield (f"batch_size {cfg.batch_size} is not divisible by num_workers {cfg.num_workers}: "
               "the global batch is split evenly across workers")
    if not cfg.learning_rate > 0:
        yield f"learning_rate must be positive, got {cfg.learning_rate}"
    if cfg.model not in MODELS:
        yield f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}"
    if cfg.cpus_per_worker < 1:
        yield f"cpus_per_worker must be at least 1, got {cfg.cpus_per_worker}"
    if cfg.local_cpus is not None and cfg.local_cpus < 1:
        yield f"local_cpus must be at least 1, got {cfg.local_cpus}"
    if cfg.max_failures < -1:
        yield f"max_failures must be -1 (unlimited) or more, got {cfg.max_failures}"
    if cfg.keep_checkpoints < 1:
        yield f"keep_checkpoints must be at least 1, got {cfg.keep_checkpoints}"
    if not cfg.collective_timeout_s > 0:
        yield f"collective_timeout_s must be positive, got {cfg.collective_timeout_s}"
    if cfg.steps_per_call < 1:
        yield f"steps_per_call must be at least 1, got {cfg.steps_per_call}"
