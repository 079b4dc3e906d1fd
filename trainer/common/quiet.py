"""Keep library chatter off the console and in log files; --verbose turns all of this off.

TensorFlow 2.21 writes C++ notices (oneDNN, "could not find cuda drivers", absl's "All log
messages before absl::InitializeLog()") straight to file descriptor 2 while it is imported, whatever
TF_CPP_MIN_LOG_LEVEL says (tensorflow#100442). So the import runs with fd 2 pointed at a log file,
`log_file()`, which also gets a failed worker's full traceback (the console gets a summary).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import tempfile
import threading
import traceback


@contextlib.contextmanager
def stderr_to(path: str):
    """Point this process's file descriptor 2 at `path` (appending) while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def log_dir() -> str:
    """Where this process's chatter goes: beside its own stderr file when that is a file (a Ray
    worker's logs/worker-*.err), else the temp directory."""
    try:
        target = os.readlink("/proc/self/fd/2")
        if stat.S_ISREG(os.stat(target).st_mode):
            return os.path.dirname(target)
    except OSError:
        pass
    return tempfile.gettempdir()


def log_file() -> str:
    """This process's own log: mnist-<pid>.log in log_dir()."""
    return os.path.join(log_dir(), f"mnist-{os.getpid()}.log")


_IMPORTING = threading.Lock()  # one import at a time: a caller waits for import_tensorflow_soon's


def import_tensorflow(verbose: bool = False):
    """`import tensorflow`, with its import-time C++ notices sent to log_file(), and those
    of its first look at the devices ("failed call to cuInit" on a machine without a GPU). A call
    while import_tensorflow_soon's thread imports waits for it, loggers set."""
    with _IMPORTING:
        if verbose or "tensorflow" in sys.modules:
            import tensorflow as tf
            return tf
        with stderr_to(log_file()):
            import tensorflow as tf
            tf.config.list_physical_devices()  # lists only: devices can still be hidden afterwards
        tf.get_logger().setLevel("ERROR")
        logging.getLogger("absl").setLevel(logging.ERROR)  # Keras' "HDF5 is legacy" notice, among others
        return tf


def import_tensorflow_soon(verbose: bool = False) -> None:
    """import_tensorflow on a thread, while this process waits on something else (the driver, on its
    local Ray going down); the next import_tensorflow call waits for it. While it runs, this process's
    file descriptor 2 is the log file's (stderr_to)."""
    threading.Thread(target=import_tensorflow, args=(verbose,), name="import-tensorflow", daemon=True).start()


def log_to_file(name: str) -> None:
    """The Python logger `name` (a library's) writes to log_file(), not to the console."""
    logger = logging.getLogger(name)
    logger.addHandler(logging.FileHandler(log_file()))
    logger.propagate = False


def quiet_ray_train_console() -> None:
    """Ray Train's own lines off a worker's console (they stay in its log files): the per-report
    INFO lines, and the full traceback it logs when the training function raises (the driver prints
    the worker's summary, trainer/train/failures.py). RunConfig(logging_config=LoggingConfig("WARNING"))
    reaches the controller but, in Ray 2.60, not the workers' console handler."""
    for handler in logging.getLogger("ray.train").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.CRITICAL)


def route_unraisable() -> None:
    """Ray's worker_process_setup_hook for a quiet run: what Python can only report ("Exception
    ignored in ... __del__"), such as Ray Data's SplitCoordinator stopped by Ray's SIGTERM inside
    its executor's __del__ whenever the worker group is torn down (a restart, a failed run), goes to
    log_file(), not to the console."""
    def to_log(unraisable) -> None:
        with open(log_file(), "a") as f:
            f.write(f"{unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}\n")
            traceback.print_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback, file=f)

    sys.unraisablehook = to_log


NODE_LOST = "has been marked dead"  # Ray's notice for a lost node, from the cluster's error channel
# The raylet's notice when many actors start at once (a search's trials, controllers and workers on
# a small node): "WARNING: 8 PYTHON worker processes have been started on node ...", several lines.
MANY_WORKERS = "worker processes have been started on node"
# Ray Train's placement group cleaner, each time it frees a stopped trial's workers' reservation:
# "Detected that the Ray Train controller actor (...) is dead. Cleaning up placement group = [...]".
PG_CLEANED = "Cleaning up placement group"


def route_node_notices() -> None:
    """On the driver, after ray.init: Ray's "(raylet) The node with node id ... has been marked
    dead" notice goes to log_file(), not the console (with colour codes, seven lines of possible
    causes, on every lost node); so do the raylet's MANY_WORKERS notice and the PG_CLEANED line of
    Ray Train's placement group cleaner, each time a search stops a trial. The job's own line says
    what it did about the node: a restart, or an elastic resize. Every other notice still prints.
    Ray prints the cluster's error messages through ray._private.worker.print_to_stdstream, and
    every process's lines through its print_worker_logs, internals: if an upgrade moves them, the
    notices come back and nothing breaks."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "routes_node_notices", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        lines = data.get("lines", [])
        if data.get("pid") == "raylet" and any(NODE_LOST in line or MANY_WORKERS in line for line in lines):
            with open(log_file(), "a") as f:
                f.write("".join(f"(raylet) {line}\n" for line in lines))
            return
        original(data, ignore_prefix)

    print_to_stdstream.routes_node_notices = True
    ray_worker.print_to_stdstream = print_to_stdstream
    printing = getattr(ray_worker, "print_worker_logs", None)
    if printing is None:
        return

    def print_worker_logs(data, print_file, *args, **kwargs):  # the workers' and actors' own lines
        lines = data.get("lines", [])
        routed = [line for line in lines if PG_CLEANED in line]
        if routed:
            with open(log_file(), "a") as f:
                f.write("".join(f"(pid={data.get('pid')}) {line}\n" for line in routed))
            data = {**data, "lines": [line for line in lines if PG_CLEANED not in line]}
            if not data["lines"]:
                return
        printing(data, print_file, *args, **kwargs)

    ray_worker.print_worker_logs = print_worker_logs
