"""The job's one config object: every setting, each default defined once, validated on creation.

The CLI is generated from these fields (trainer/train/cli.py); the config crosses the Ray boundary
as a plain dict (`dataclasses.asdict(cfg)` on the driver, `Config(**d)` on the worker).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from trainer.common.cli import FIELD_TYPES, INSTANCE_OF, option
from trainer.common.errors import UsageError

MODELS = ("mlp", "cnn")
PLACEMENTS = ("PACK", "SPREAD")
PIN_CPUS = ("auto", "yes", "no")
LR_SCALINGS = ("none", "linear", "sqrt")


DATA_PATHS = ("auto", "memory", "stream")
ALLREDUCE_DTYPES = ("bfloat16", "float32")
STREAM_ABOVE_ROWS = 250_000  # --data-path auto streams past this many training rows (docs/performance.md)
BASE_BATCH_SIZE = 128  # the tutorial's: the default global batch, the learning rate's reference
TENSORBOARD_SCHEMES = ("file", "gs")  # what tf.summary can write to in a stock TensorFlow


# What a setting shapes, marked once on its field (`shapes=`) and read by resume and retraining:
WEIGHTS = "weights"  # the weights and optimizer state: a resumed run must keep it
RESULT = "result"  # what a finished run learned (with WEIGHTS): a change is a reason to retrain
# Unmarked settings say where and how a run executes (paths, cluster, logging): no reason to retrain.


def _opt(default, help, shapes: str | None = None, **extra):
    """An option (trainer/common/cli.py) that also says what it shapes: WEIGHTS, RESULT or nothing."""
    return option(default, help, shapes=shapes, **extra)


def default_of(name: str):
    """The default of Config field `name`: what a record written before the field existed meant."""
    return next(f.default for f in dataclasses.fields(Config) if f.name == name)


def fields_shaping(*what: str) -> tuple[str, ...]:
    """Names of the Config fields marked with any of `what` (WEIGHTS, RESULT), in field order."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("shapes") in what)


@dataclass(frozen=True)
class Config:
    # Data and outputs.
    data: str | None = _opt(
        None, "MNIST source: a Keras .npz, a directory of IDX files (.gz or raw), or a Parquet "
        "directory this project wrote (a local path or a URI such as s3://bucket/mnist-parquet) "
        "(default: $MNIST_DATA, else the keras.datasets download)")
    data_path: str = _opt(
        "auto", "how workers get the training rows: memory (the driver hands Ray Data the split, each "
        "worker keeps its shard), stream (each worker reads its share from the Parquet files every "
        "epoch, a shuffle buffer at a time: memory stays flat as the data grows; see trainer/data/stream.py), "
        f"or auto: memory up to {STREAM_ABOVE_ROWS:,} training rows, stream above", choices=DATA_PATHS)
    output: str = _opt("models", "local directory for mnist.keras, mnist.h5, metrics.json, "
                       "evaluation.json and the plots")
    storage_path: str | None = _opt(
        None, "where Ray Train keeps checkpoints, prepared Parquet data and a copy of the final "
        "outputs (<run>/model): a local path, or a URI such as s3://bucket/mnist "
        "(default: <output>/ray_results)")
    run_name: str | None = _opt(None, "Ray Train run name; reuse it to resume (default: a timestamp)")
    # The recipe (the classic Keras MNIST tutorial).
    model: str = _opt("mlp", "mlp: Dense(512)+Dense(10) (tutorial); cnn: small convnet", choices=MODELS, shapes=WEIGHTS)
    hidden_units: int = _opt(512, "mlp: the hidden layer's width (the tutorial's 512)", shapes=WEIGHTS)
    dropout: float = _opt(0.0, "mlp: dropout after the hidden layer while training (0: none, the tutorial)",
                          shapes=WEIGHTS)
    epochs: int = _opt(5, "training epochs", shapes=RESULT)
    batch_size: int | None = _opt(
        None, f"global batch size, split across the workers, any remainder one example each to the first "
        f"ranks (default: {BASE_BATCH_SIZE}, the tutorial's, whatever the worker count; or "
        "--per-worker-batch-size x --num-workers)", shapes=WEIGHTS)
    per_worker_batch_size: int | None = _opt(
        None, "batch per worker instead of a fixed global batch: the global batch grows with the workers", shapes=RESULT)
    learning_rate: float = _opt(
        0.001, f"RMSprop learning rate; with --lr-scaling, the rate at global batch {BASE_BATCH_SIZE}", shapes=WEIGHTS)
    lr_scaling: str = _opt(
        "none", f"scale the learning rate with global batch / {BASE_BATCH_SIZE}: none (the tutorial), "
        "linear, or sqrt", choices=LR_SCALINGS, shapes=WEIGHTS)
    warmup_epochs: int = _opt(
        0, "ramp the learning rate linearly, every step, from --learning-rate to the scaled rate "
        "over these first epochs (needs --lr-scaling)", shapes=WEIGHTS)
    seed: int = _opt(0, "seed for weight init and shuffling", shapes=WEIGHTS)
    init_from: str | None = _opt(
        None, "start from a trained model's weights instead of random ones: a .keras or .h5 file, "
        "or store:current / store:VERSION from --store (see trainer/train/warm.py)", shapes=RESULT)
    init_optimizer: bool = _opt(False, "with --init-from: also start from its RMSprop state "
                                "(a .keras file keeps it); else the optimizer starts fresh", shapes=RESULT)
    store: str | None = _opt(None, "a model store directory (mnist-retrain's): where --init-from "
                             "store:... looks; mnist-retrain requires it")
    # Cluster.
    num_workers: int | tuple[int, int] = _opt(
        2, "Ray Train workers (one model replica each): N, or MIN-MAX to train elastically, on as many "
        "as the cluster holds and growing or shrinking while the run goes (see docs/operations.md)", shapes=RESULT)
    resize_interval_s: float = _opt(
        60.0, "with --num-workers MIN-MAX: seconds between Ray Train's checks for room to grow "
        "(each resize restarts the workers from the latest checkpoint)")
    cpus_per_worker: int = _opt(1, "CPUs reserved per worker; also TensorFlow's thread count")
    pin_cpus: str = _opt(
        "auto", "give each worker cores of its own (CPU affinity: the i-th worker on a node gets its "
        "--cpus-per-worker cores from the i-th group), so that its TensorFlow threads and its all-reduce's "
        "threads share them: auto on a Ray this job starts itself, where nothing else runs, for CPU workers "
        "(a GPU worker's all-reduce is not on the CPU); yes on a "
        "cluster too (nodes that run nothing else); no never. Pins nothing where the node has fewer "
        "cores than its workers ask for (docs/performance.md, the all-reduce)", choices=PIN_CPUS)
    use_gpu: bool = _opt(False, "one GPU per worker", shapes=RESULT)
    placement_strategy: str = _opt(
        "PACK", "PACK workers onto few nodes, or SPREAD them across nodes", choices=PLACEMENTS)
    address: str | None = _opt(
        None, "Ray cluster to join ('auto' or host:port) (default: $RAY_ADDRESS, else a local Ray)")
    local_cpus: int | None = _opt(
        None, "logical CPUs of the local Ray (default: this machine's cores)")
    resource_wait_s: float = _opt(
        0.0, "on an autoscaling cluster: seconds to wait for room for the workers (asking the "
        "autoscaler for it) before failing; 0 fails at once")
    # Fault tolerance.
    max_failures: int = _opt(
        3, "worker-group restarts Ray Train may make, each from the latest checkpoint, before the run fails "
        "(FailureConfig; -1: no limit). A transient fault (a killed or preempted worker, a lost node, a "
        "stall past --stall-timeout-s) costs one restart and the epoch in flight")
    keep_checkpoints: int = _opt(2, "newest checkpoints to keep (CheckpointConfig)")
    force: bool = _opt(False, "retrain even if --run-name already finished (its folder is moved aside)")
    stall_timeout_s: float = _opt(
        60.0, "seconds a worker may be silent (a paused VM, steal time, a long GC pause) before its peers "
        "give it up: TensorFlow's coordination heartbeat timeout, and each worker's watchdog on its "
        "collectives. A stall of up to half this passes unnoticed; a peer frozen longer fails the step "
        "and Ray Train restarts the group (--max-failures). A process that dies is noticed at once")
    # Speed.
    steps_per_call: int = _opt(20, "training steps per tf.function call (fewer Python round trips)")
    allreduce_dtype: str = _opt(
        "bfloat16", "the type gradients cross the workers in, each step: bfloat16 (half the bytes of the "
        "all-reduce, float32's range; the update itself stays float32) or float32. One worker reduces "
        "nothing and stays float32 (docs/performance.md, the all-reduce)", choices=ALLREDUCE_DTYPES)
    # What users look at.
    augment: bool = _opt(False, "random rotation (10 deg), translation and zoom (10%) while training; "
                         "off at evaluation and in the saved model's predictions", shapes=WEIGHTS)
    tensorboard_dir: str | None = _opt(
        None, "write per-epoch scalars (loss, accuracy, learning rate, samples/s) here from rank 0 "
        "for `tensorboard --logdir`; a local path, or gs://")
    export_savedmodel: bool = _opt(False, "also write a TensorFlow SavedModel with a serving signature "
                                   "to <output>/mnist_savedmodel")
    # Tracking (MLflow, optional: trainer/track/).
    track: bool = _opt(False, "record the run in MLflow (pip install -e \".[tracking]\"): at --tracking-uri, else "
                       "$MLFLOW_TRACKING_URI, else an embedded SQLite store <output>/mlflow.db, which needs no server")
    tracking_uri: str | None = _opt(
        None, "MLflow tracking server or store, such as http://127.0.0.1:5000 or sqlite:///mlflow.db; turns "
        "tracking on (default: $MLFLOW_TRACKING_URI, which turns it on too). Credentials go in MLflow's own "
        "variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), never in the URI")
    no_tracking: bool = _opt(False, "never track, even with $MLFLOW_TRACKING_URI set")
    experiment: str = _opt("mnist", "MLflow experiment of the run")
    verbose: bool = _opt(False, "also print Ray's and TensorFlow's own log lines (per-report, checkpoint "
                         "and C++ notices), which otherwise go only to Ray's log files")

    def __post_init__(self):
        if isinstance(self.num_workers, (list, tuple)):  # from JSON a list; MIN-MAX with MIN == MAX is fixed
            span = tuple(self.num_workers)
            object.__setattr__(self, "num_workers", span[0] if len(span) == 2 and span[0] == span[1] else span)
        if self.batch_size is None:  # resolved once, here: per-worker batch x workers, else the tutorial's
            object.__setattr__(self, "batch_size", _default_batch_size(self))
        problems = list(_problems(self))
        if problems:
            raise UsageError(problems[0])
        if self.tensorboard_dir and "://" not in self.tensorboard_dir:  # Ray Train runs workers elsewhere
            object.__setattr__(self, "tensorboard_dir", os.path.abspath(self.tensorboard_dir))

    def streams(self, train_rows: int) -> bool:
        """Whether the workers stream a training split of `train_rows` rows (--data-path)."""
        return self.data_path == "stream" or (self.data_path == "auto" and train_rows > STREAM_ABOVE_ROWS)

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UsageError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)


_untyped = [f.name for f in dataclasses.fields(Config) if f.type not in FIELD_TYPES]
if _untyped:
    raise TypeError(f"Config fields with an annotation FIELD_TYPES lacks: {', '.join(_untyped)}")


def rank_batch(global_batch: int, world_size: int, rank: int) -> int:
    """Rank `rank`'s share of the global batch: equal parts, the remainder one each to the first ranks."""
    return global_batch // world_size + (rank < global_batch % world_size)


def steps_per_epoch(shard_rows: int, global_batch: int, world_size: int) -> int:
    """Steps every worker runs per epoch on equal shards: as many as the largest per-rank batch allows."""
    return shard_rows // rank_batch(global_batch, world_size, 0)


def _default_batch_size(cfg: Config) -> int:
    if type(cfg.per_worker_batch_size) is int and type(cfg.num_workers) is int:  # else _problems says
        return cfg.per_worker_batch_size * cfg.num_workers
    return BASE_BATCH_SIZE


def _problems(cfg: Config):
    """Yield one sentence per invalid setting, in field order."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        parse, optional = FIELD_TYPES[f.type]
        expected = INSTANCE_OF.get(parse, parse)
        if not (value is None and optional) and (not isinstance(value, expected) or
                                                 (parse is not bool and isinstance(value, bool))):
            yield f"{f.name} must be a {f.type}, got {value!r}"
            return
    if cfg.epochs < 1:
        yield f"epochs must be at least 1, got {cfg.epochs}"
    per_worker = cfg.per_worker_batch_size
    if per_worker is not None and per_worker < 1:
        yield f"per_worker_batch_size must be at least 1, got {per_worker}"
    elif per_worker is not None and not cfg.elastic and cfg.batch_size != per_worker * cfg.num_workers:
        yield (f"give batch_size (global) or per_worker_batch_size, not both: batch_size "
               f"{cfg.batch_size} is not {per_worker} x {cfg.num_workers} workers")
    if cfg.elastic and not (len(cfg.num_workers) == 2 and all(type(n) is int for n in cfg.num_workers)):
        yield f"num_workers must be N or MIN-MAX, got {cfg.num_workers!r}"
    elif cfg.min_workers < 1:
        yield f"num_workers must be at least 1, got {cfg.min_workers}"
    elif cfg.min_workers > cfg.max_workers:
        yield f"num_workers {cfg.min_workers}-{cfg.max_workers}: MIN must not exceed MAX"
    elif cfg.batch_size < cfg.max_workers:
        yield (f"batch_size {cfg.batch_size} is smaller than num_workers {cfg.max_workers}: "
               "every worker needs at least one example per step")
    elif cfg.elastic and per_worker is not None:
        yield ("per_worker_batch_size grows the global batch with the worker count; an elastic run "
               "keeps one global batch at every size: give --batch-size")
    if cfg.resize_interval_s < 0:
        yield f"resize_interval_s must be 0 or more, got {cfg.resize_interval_s}"
    if not cfg.learning_rate > 0:
        yield f"learning_rate must be positive, got {cfg.learning_rate}"
    if cfg.lr_scaling not in LR_SCALINGS:
        yield f"unknown lr_scaling {cfg.lr_scaling!r}; choose one of {', '.join(LR_SCALINGS)}"
    if cfg.warmup_epochs < 0:
        yield f"warmup_epochs must be 0 or more, got {cfg.warmup_epochs}"
    elif cfg.warmup_epochs and cfg.lr_scaling == "none":
        yield "warmup_epochs ramps up to a scaled learning rate: give --lr-scaling linear or sqrt too"
    if cfg.init_from is not None and not cfg.init_from.strip():
        yield "init_from must name a model file or store:current, got an empty string"
    elif cfg.init_from and cfg.init_from.startswith("store:") and not cfg.store:
        yield f"--init-from {cfg.init_from} reads a model store: give --store DIR too"
    if cfg.init_optimizer and not cfg.init_from:
        yield "--init-optimizer loads the optimizer state of the --init-from model: give --init-from too"
    if cfg.data_path not in DATA_PATHS:
        yield f"unknown data_path {cfg.data_path!r}; choose one of {', '.join(DATA_PATHS)}"
    if cfg.model not in MODELS:
        yield f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}"
    if cfg.hidden_units < 1:
        yield f"hidden_units must be at least 1, got {cfg.hidden_units}"
    if not 0 <= cfg.dropout < 1:
        yield f"dropout must lie in 0..1 (a fraction of the units, 1 excluded), got {cfg.dropout}"
    if cfg.cpus_per_worker < 1:
        yield f"cpus_per_worker must be at least 1, got {cfg.cpus_per_worker}"
    if cfg.placement_strategy not in PLACEMENTS:
        yield f"unknown placement strategy {cfg.placement_strategy!r}; choose PACK or SPREAD"
    if cfg.run_name is not None and (not cfg.run_name or "/" in cfg.run_name
                                     or cfg.run_name.startswith((".", "_"))):
        yield f"run_name {cfg.run_name!r} must be a plain folder name (no '/', not starting with . or _)"
    if cfg.local_cpus is not None and cfg.local_cpus < 1:
        yield f"local_cpus must be at least 1, got {cfg.local_cpus}"
    if cfg.max_failures < -1:
        yield f"max_failures must be -1 (unlimited) or more, got {cfg.max_failures}"
    if cfg.keep_checkpoints < 1:
        yield f"keep_checkpoints must be at least 1, got {cfg.keep_checkpoints}"
    if cfg.resource_wait_s < 0:
        yield f"resource_wait_s must be 0 or more, got {cfg.resource_wait_s}"
    if not cfg.stall_timeout_s >= 1:
        yield f"stall_timeout_s must be at least 1 (seconds), got {cfg.stall_timeout_s}"
    if cfg.steps_per_call < 1:
        yield f"steps_per_call must be at least 1, got {cfg.steps_per_call}"
    if cfg.tracking_uri is not None and not cfg.tracking_uri.strip():
        yield "tracking_uri must be a URI such as http://127.0.0.1:5000, got an empty string"
    elif cfg.tracking_uri and _password_in(cfg.tracking_uri):
        yield ("tracking_uri must not hold a password (it would be logged with the config): put it in "
               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    if cfg.no_tracking and (cfg.track or cfg.tracking_uri):
        yield "--no-tracking turns tracking off: drop --track and --tracking-uri, or drop --no-tracking"
    if not cfg.experiment.strip():
        yield "experiment must name an MLflow experiment, got an empty string"
    if cfg.tensorboard_dir is not None:
        scheme = cfg.tensorboard_dir.split("://")[0] if "://" in cfg.tensorboard_dir else "file"
        if not cfg.tensorboard_dir.strip():
            yield "tensorboard_dir must be a directory, got an empty string"
        elif scheme not in TENSORBOARD_SCHEMES:
            yield (f"tensorboard_dir {cfg.tensorboard_dir!r}: TensorFlow cannot write event files to "
                   f"{scheme}:// (only local paths and gs://); write locally and copy the folder")


def _password_in(uri: str) -> bool:
    """Whether a URI carries user:password@ (a token or password that would reach the logs)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(uri).password is not None
    except ValueError:
        return False
