"""A failure as data: a worker's WorkerFailure (its kind, rank, exception, last frame and log), the
cause named from Ray Train's worker errors by those fields, the driver's message, and the restart
record. Unit tier: every error is the real class (TensorFlow's, Ray's, Ray Train's), with the text a
real run produced where the class carries no field."""

import pickle
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from trainer.train import failures

# What rank 0 raised when rank 1 was frozen for 20 s under TensorFlow's 10 s heartbeat timeout
# (scripts/stall.py --stall 20 on main before the stall timeout), message as TensorFlow wrote it.
HEARTBEAT = """Graph execution error:

Detected at node while/rm_sprop/CollectiveReduceV2 defined at (most recent call last):
  File "/usr/lib/python3.11/threading.py", line 1002, in _bootstrap

  File "/repo/trainer/train/worker.py", line 200, in train_steps

Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped sending heartbeats):
/job:worker/replica:0/task:1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.
The error could be from a previous operation. Restart your program to reset.
	 [[{{node while/rm_sprop/CollectiveReduceV2}}]] [Op:__inference_train_steps_519]"""


def unavailable(message: str):
    """TensorFlow's own error for an aborted collective, with the message a real run got."""
    import tensorflow as tf

    return tf.errors.UnavailableError(None, None, message)


def raise_in_a_step():
    def train_steps():
        raise unavailable(HEARTBEAT)

    train_steps()


def caught(function) -> BaseException:
    try:
        function()
    except Exception as exc:  # noqa: BLE001 - the point is to summarize whatever it was
        return exc
    raise AssertionError("did not raise")


def test_a_failure_carries_its_fields_and_reads_as_the_last_frame_and_the_exception():
    failure = failures.WorkerFailure.of(caught(raise_in_a_step), 0, "/tmp/ray/session/logs/mnist-42.log")
    assert (failure.kind, failure.rank, failure.peer) == (failures.PEER_FROZEN, 0, 1)
    assert failure.exception == "tensorflow.python.framework.errors_impl.UnavailableError"
    assert failure.frame[0].endswith("in train_steps") and failure.log.endswith("mnist-42.log")
    summary = str(failure)
    lines = summary.splitlines()
    assert lines[0].startswith('  File "') and lines[0].endswith("in train_steps")
    assert lines[1] == "    raise unavailable(HEARTBEAT)"
    assert lines[2] == "tensorflow.python.framework.errors_impl.UnavailableError: Graph execution error:"
    assert lines[3].startswith("Collective ops is aborted by: Error reported from /job:worker/task:1")
    assert "Detected at node" not in summary and "threading.py" not in summary
    assert lines[-1] == "full worker log: /tmp/ray/session/logs/mnist-42.log"
    assert len(lines) <= 2 + failures.MESSAGE_LINES + 1


def test_a_worker_failure_crosses_processes_without_importing_tensorflow():
    """What the controller and the driver unpickle: before, TensorFlow's own exception, whose
    unpickling imported TensorFlow there and printed its C++ start-up notices to the console."""
    payload = pickle.dumps(failures.WorkerFailure.of(caught(raise_in_a_step), 1, None))
    script = ("import pickle, sys; sys.path.insert(0, sys.argv[1]); error = pickle.loads(sys.stdin.buffer.read()); "
              "print(type(error).__name__, error.kind.replace(' ', '_'), error.rank, error.peer, "
              "'tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], input=payload, capture_output=True, timeout=60)
    assert proc.stdout.decode().split() == ["WorkerFailure", "peer_frozen", "1", "1", "False"], proc.stderr.decode()[-2000:]


def worker_failure(rank: int, exc: BaseException) -> failures.WorkerFailure:
    """What Ray Train hands the controller for a worker whose loop raised: the WorkerFailure itself."""
    return failures.WorkerFailure.of(exc, rank, f"/logs/mnist-{rank}.log")


def died(message: str):
    """Ray Train's error for a worker whose actor died: its health check failed with Ray's ActorDiedError."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    context = ActorDiedErrorContext(error_message=message, class_name="RayTrainWorker", actor_id=b"\1" * 16, pid=42)
    return WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(...)",
                                        ActorDiedError(context))


def test_the_cause_names_the_frozen_rank_from_the_heartbeat_error_and_its_summary_is_shown():
    errors = {0: worker_failure(0, caught(raise_in_a_step)), 1: worker_failure(1, caught(raise_in_a_step))}
    assert failures.cause(errors) == (1, "heartbeat timeout on rank 1")
    message = failures.explain(type("Failed", (), {"worker_failures": errors})(), restarts=3)
    first, *rest = message.splitlines()
    assert first == "training failed after 3 restarts: heartbeat timeout on rank 1"
    assert rest[-1] == "full worker log: /logs/mnist-1.log" and len(rest) <= 10


def test_the_cause_prefers_a_dead_process_or_a_lost_node_over_its_peers_aborted_collectives():
    killed = died("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR")
    errors = {0: worker_failure(0, caught(raise_in_a_step)), 1: killed}
    assert failures.cause(errors) == (1, "rank 1's process died")
    assert failures.worker_summaries(errors)[1] == (
        "ActorDiedError: The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR")
    lost = died("The actor died because its node has died. Node Id: 0123abcd")
    assert failures.cause({0: worker_failure(0, caught(raise_in_a_step)), 1: lost}) == (1, "the node of rank 1 was lost")


def test_the_cause_names_a_peer_whose_connection_dropped():
    """What rank 0 raised when rank 1's node was removed without grace (tests/test_faults.py)."""
    def reset():
        raise unavailable(
            "Graph execution error:\n\nCollective ops is aborted by: recvmsg:Connection reset by peer\n"
            "Additional GRPC error information from remote target /job:worker/replica:0/task:1 while calling "
            "/tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error received from peer  {grpc_status:14}\n"
            "Additional GRPC error information from remote target /job:worker/replica:0/task:2 while calling "
            "/tensorflow.WorkerService/RecvBuf:")

    assert failures.cause({0: worker_failure(0, caught(reset))}) == (0, "lost the connection to rank 1")
    assert worker_failure(0, caught(reset)).kind == failures.PEER_LOST


def test_the_cause_names_a_peer_that_never_reached_the_report_barrier():
    """What rank 0 raised when rank 1 froze for good before ray.train.report's checkpoint-name barrier."""
    from ray.train.v2._internal.exceptions import BroadcastCollectiveTimeoutError

    def late():
        raise BroadcastCollectiveTimeoutError(time_elapsed=5.01, missing_ranks=[1], timeout_s=5.0)

    assert failures.cause({0: worker_failure(0, caught(late))}) == (0, "no progress for 5s on rank 1")
    failure = worker_failure(0, caught(late))
    assert (failure.kind, failure.peer, failure.seconds) == (failures.PEER_LATE, 1, 5.0)


def test_the_ray_train_report_barrier_is_bounded_by_the_stall_timeout():
    from trainer.config import Config
    from trainer.train import cluster

    assert cluster.ray_settings(Config())["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] == "60"
    assert cluster.ray_settings(Config(stall_timeout_s=7.5))["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] == "7.5"


def test_relayed_lines_are_coloured_only_on_a_terminal(monkeypatch):
    """Ray's driver colours the "(raylet)" prefix of lines it relays whatever reads them; the job
    turns that off unless its own stdout is a terminal."""
    import io

    from trainer.config import Config
    from trainer.train import cluster

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert cluster.ray_settings(Config())["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setattr("sys.stdout", Terminal())
    assert "RAY_COLOR_PREFIX" not in cluster.ray_settings(Config())


def test_a_joined_cluster_gets_the_quiet_settings_the_submission_does_not_already_set(monkeypatch):
    """Its raylets were started without them; `ray job submit`'s runtime env may set some already,
    and ray.init refuses a variable set twice. The value in the driver's environment wins."""
    import json

    from trainer.train import cluster

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    assert cluster.forwarded_env() == {**cluster.QUIET_ENV, "TF_CPP_MIN_LOG_LEVEL": "1"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}, "working_dir": "x"}}))
    forwarded = cluster.forwarded_env()
    assert "RAY_DATA_LOG_LEVEL" not in forwarded and set(forwarded) == set(cluster.QUIET_ENV) - {"RAY_DATA_LOG_LEVEL"}


def test_rays_notice_of_a_lost_node_goes_to_the_log_file_and_every_other_notice_prints(monkeypatch, capsys):
    """The driver's listener prints the cluster's error messages through Ray's print_to_stdstream
    (an internal, looked up at each message): the node-death notice, which the job's restart line
    covers, goes to the process's log file; any other still reaches the console."""
    import ray._private.worker as ray_worker

    from trainer.common import quiet

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    quiet.route_node_notices()
    quiet.route_node_notices()  # once is enough: no second wrapper
    assert ray_worker.print_to_stdstream.routes_node_notices
    dead = ("The node with node id: 22990e85 and address: 10.77.0.3 and node name: 10.77.0.3 has been marked "
            "dead because the detector has missed too many heartbeats from it.")
    ray_worker.print_to_stdstream({"lines": [dead], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["out of memory: killed a worker"], "pid": "raylet", "is_err": False},
                                  ignore_prefix=False)
    printed = capsys.readouterr()
    assert "marked dead" not in printed.out + printed.err
    assert "(raylet) out of memory: killed a worker" in printed.out + printed.err
    with open(quiet.log_file()) as f:
        assert f"(raylet) {dead}\n" in f.read()


def test_the_cause_names_the_watchdog_from_its_own_record_and_else_the_exception():
    """The watchdog's abort (a real one, of a real Watchdog) fails the step; the worker's failure
    says so from the watchdog's record, not from the words of the error it caused."""
    import threading

    from trainer.train.watchdog import Watchdog

    aborted = threading.Event()
    dog = Watchdog(0.2, lambda reason: aborted.set())
    assert aborted.wait(30) and dog.fired == 0.2
    dog.stop()

    def silent():
        raise unavailable("Collective ops is aborted by: no progress for 0.2s: a peer is gone or stalled "
                          "(--stall-timeout-s)")

    stalled = failures.WorkerFailure.of(caught(silent), 0, None, stalled_after=dog.fired)
    assert (stalled.kind, stalled.seconds) == (failures.STALLED, 0.2)
    assert failures.cause({0: stalled}) == (0, "no progress for 0.2s on rank 0")
    assert failures.WorkerFailure.of(caught(silent), 0, None).kind == failures.ERROR  # no record: not the watchdog

    def bug():
        raise ValueError("shapes (128, 784) and (10,) not aligned")

    assert failures.cause({2: worker_failure(2, caught(bug))}) == (
        2, "ValueError: shapes (128, 784) and (10,) not aligned on rank 2")


def test_a_controller_failure_gives_its_first_line():
    error = type("Failed", (), {"controller_failure": RuntimeError("could not start the workers\ndetails")})()
    assert failures.explain(error, restarts=0) == "training failed: could not start the workers"


def test_restart_records_append_and_read_back(tmp_path):
    path = str(tmp_path / "run" / failures.RECORD)
    (tmp_path / "run").mkdir()
    assert failures.read_records(path) == []
    for restart in (1, 2):
        failures.append_record(path, {"restart": restart, "of": 3, "cause": "heartbeat timeout on rank 1",
                                      "continuing_from_epoch": 3, "at_unix": 0.0, "workers": {1: "summary"}})
    records = failures.read_records(path)
    assert [r["restart"] for r in records] == [1, 2] and records[0]["workers"] == {"1": "summary"}


@pytest.mark.parametrize("text", ["", "not json"])
def test_an_unreadable_record_reads_as_no_restarts(tmp_path, text):
    path = tmp_path / failures.RECORD
    path.write_text(text)
    assert failures.read_records(str(path)) == []


def test_a_cluster_without_a_dashboard_still_drops_rays_placement_group_cleaner():
    """trainer/train/backend.py reaches into Ray Train's internals to drop the cleaner where it cannot
    work (no dashboard, no state API), and falls back to the stock trainer if an upgrade moves them;
    this says so loudly instead."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from trainer.train.backend import trainer_class

    assert trainer_class(cleaner=True) is DataParallelTrainer
    without = trainer_class(cleaner=False)
    assert without is not DataParallelTrainer and issubclass(without, DataParallelTrainer)
    trainer = without(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert not any(isinstance(c, PlacementGroupCleanerCallback) for c in trainer._create_default_callbacks())


def test_an_elastic_runs_start_retries_leave_the_console_and_every_other_error_stays(tmp_path, monkeypatch):
    """quiet_start_retries' controller callback, on a logger set up as Ray Train sets up its
    controller's (a console handler and a file handler on "ray.train", not propagating): the
    WorkerGroupStartupTimeoutError that an elastic run's retries at the old size log with a full
    traceback leaves the console and stays in the file; any other error still prints. The callback
    crosses to the controller by cloudpickle, as RunConfig's callbacks do."""
    import io
    import logging

    import ray.cloudpickle
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from trainer.train.backend import quiet_start_retries

    console, log_file = io.StringIO(), tmp_path / "controller.log"
    train_logger = logging.getLogger("ray.train")
    monkeypatch.setattr(train_logger, "handlers", [logging.StreamHandler(console), logging.FileHandler(log_file)])
    monkeypatch.setattr(train_logger, "propagate", False)
    (callback,) = quiet_start_retries()
    ray.cloudpickle.loads(ray.cloudpickle.dumps(callback)).after_controller_start(None)
    controller = logging.getLogger("ray.train.v2._internal.execution.controller.controller")
    for error in (WorkerGroupStartupTimeoutError(2), ValueError("a real problem")):
        try:
            raise error
        except Exception as exc:
            controller.exception("Error in control loop iteration: %s", exc)
    for handler in train_logger.handlers:
        handler.close()
    shown, kept = console.getvalue(), log_file.read_text()
    assert "WorkerGroupStartupTimeoutError" not in shown and "ValueError: a real problem" in shown
    assert "WorkerGroupStartupTimeoutError" in kept and "ValueError: a real problem" in kept
    assert shown.count("Traceback") == 1
