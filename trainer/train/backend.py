"""Ray Train's hook that wires the workers into one MultiWorkerMirroredStrategy cluster, the
controller's callbacks (the console's lines, epochs to MLflow), and the trainer that runs it.

Ray's own `TensorflowConfig` does the same (TF_CONFIG on every worker) but lives in a package whose
`__init__` imports TensorFlow, so the driver and Ray Train's controller would each pay that import
(seconds) before any worker starts; it also sets TF_USE_LEGACY_KERAS=1, and this job is Keras 3.
This module imports no TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass

import ray
from ray.train import UserCallback
from ray.train.backend import Backend, BackendConfig

from trainer.track.run import log_epoch
from trainer.train import failures
from trainer.train.console import Lines


@dataclass
class TFConfigSetup(BackendConfig):
    """TF_CONFIG for MultiWorkerMirroredStrategy, plus the workers' TensorFlow log level."""

    tf_log_level: str = "3"  # TF_CPP_MIN_LOG_LEVEL: 3 keeps C++ notices (cuInit, ...) off the console

    @property
    def backend_cls(self):
        return _TFConfigBackend


def _address() -> str:
    """This worker's node IP and a free port for TensorFlow's collective server, which binds it
    seconds later (after TensorFlow imports)."""
    ip = ray.util.get_node_ip_address()
    port = collective_port()
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
ABOVE_RAY_WORKER_PORTS = 20_000  # Ray's workers take 10002-19999 (ray start --min/max-worker-port)
_RANDOM = random.SystemRandom()  # not the seeded module state: two workers on a node must differ


def collective_port(tries: int = 50) -> int:
    """A port that is free now, picked below the kernel's ephemeral range where it can: a port from
    that range (what bind(0) gives) is also what every outgoing connection takes, and on a busy node
    one did take ours before TensorFlow bound it ("Could not start gRPC server", a lost restart)."""
    try:
        with open(EPHEMERAL_RANGE) as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0  # not Linux: the OS's choice
    for _ in range(tries if ephemeral_low > ABOVE_RAY_WORKER_PORTS + 1000 else 0):
        port = _RANDOM.randrange(ABOVE_RAY_WORKER_PORTS, ephemeral_low)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _set_environment(addresses: list[str], rank: int, tf_log_level: str) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                          "task": {"type": "worker", "index": rank}})
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = tf_log_level  # read when TensorFlow is first imported
    os.environ.pop("TF_USE_LEGACY_KERAS", None)


class _TFConfigBackend(Backend):
    def on_start(self, worker_group, backend_config: TFConfigSetup):
        addresses = worker_group.execute(_address)
        ray.get([worker_group.execute_single_async(rank, _set_environment, addresses, rank,
                                                   backend_config.tf_log_level)
                 for rank in range(len(worker_group))])


class Console(UserCallback):
    """On Ray Train's controller: the run's console lines (trainer/train/console.py), each epoch
    once its checkpoint is registered, one line per restart or resize; and within --max-failures
    each restart's record in <run>/restarts.json (trainer/train/failures.py). Past --max-failures
    no restart line: the driver says why the run failed."""

    def __init__(self, record_path: str, max_failures: int, epochs_done: int, epochs: int,
                 epoch_lines: bool = True, prefix: str = ""):
        self.record_path, self.max_failures, self.epochs_done, self.failures = record_path, max_failures, epochs_done, 0
        self.lines = Lines(epochs)
        self.epoch_lines, self.prefix = epoch_lines, prefix  # a search's trial: its restarts only, named

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None or not metrics or "epoch" not in metrics[0]:
            return
        self.epochs_done = metrics[0]["epoch"]
        lines = self.lines.epoch(metrics[0])  # rank 0's record
        if self.epoch_lines:
            self._print(lines)

    def after_exception(self, run_context, worker_exceptions):
        self.failures += 1
        if self.max_failures != -1 and self.failures > self.max_failures:
            return  # Ray Train gives up; the driver prints why
        entry = {"restart": self.failures, "of": self.max_failures, "cause": failures.cause(worker_exceptions)[1],
                 "continuing_from_epoch": self.epochs_done + 1, "at_unix": time.time(),
                 "workers": failures.worker_summaries(worker_exceptions)}
        self._print([self.prefix + line for line in self.lines.restart(
            entry["cause"], entry["continuing_from_epoch"], self.failures, self.max_failures)])
        failures.append_record(self.record_path, entry)

    @staticmethod
    def _print(lines: list[str]) -> None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()


class EpochMetrics(UserCallback):
    """On Ray Train's controller, after each epoch's report: rank 0's numbers to the MLflow run, live
    (trainer/track/run.py). The workers never wait on it: their reports do not."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and "epoch" in metrics[0]:
            log_epoch(self.uri, self.run_id, metrics[0])


def quiet_start_retries() -> list:
    """Controller callbacks that keep an elastic run's expected retries off the console.

    After a lost node an elastic run may first ask for the old size again and wait out its short
    start timeout (cluster.ELASTIC_START_TIMEOUT_S) until Ray's view of the nodes catches up; Ray
    Train retries, and logs each WorkerGroupStartupTimeoutError as "Error in control loop iteration"
    with a full traceback (four of them, 37 lines each, on a real three-host cluster). The callback
    filters exactly those records from the controller's console handler once Ray Train has
    configured it; its log files keep them, and every other error still prints. Both names are Ray
    Train's internals: if an upgrade moves them, the tracebacks come back and nothing breaks."""
    try:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError:
        return []

    class ExpectedRetry(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and isinstance(record.exc_info[1], WorkerGroupStartupTimeoutError))

    class QuietStartRetries(ControllerCallback):
        def after_controller_start(self, train_run_context):
            for handler in logging.getLogger("ray.train").handlers:
                if not isinstance(handler, logging.FileHandler):  # the console; the files keep everything
                    handler.addFilter(ExpectedRetry())

    return [QuietStartRetries()]


def trainer_class(cleaner: bool):
    """Ray Train's DataParallelTrainer; without the placement group cleaner unless `cleaner`. That
    detached actor polls the dashboard's state API every second, so that a controller that dies on
    a shared cluster leaves no reserved CPUs behind. Where there is no dashboard it cannot work:
    a local Ray (it ends with this process, placement groups and all, and starts seconds sooner
    without a dashboard), or a cluster whose head runs without one, where it printed "Failed to
    query Ray Train Controller actor state" every few seconds (14 times in one run).
    The cleaner and the hook that creates it are Ray's internals: if an upgrade moves either, the
    stock trainer runs (a few seconds slower to start), not an ImportError."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return DataParallelTrainer
    if cleaner or not hasattr(DataParallelTrainer, "_create_default_callbacks"):
        return DataParallelTrainer

    class TrainerWithoutCleaner(DataParallelTrainer):
        def _create_default_callbacks(self):
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    return TrainerWithoutCleaner
