"""The run timeline (trainer/common/timeline.py) and the quiet console's pieces (trainer/common/quiet.py)."""

import os
import subprocess
import sys
import time

from tests.conftest import ROOT
from trainer.common.quiet import stderr_to
from trainer.common.timeline import POINTS, format_timeline, merge, process_start_time
from trainer.train.elastic import GREW, RERUN, SHRANK, resizes

# Asked only after the parent's second reading of the clock: "now" would be later than that reading.
OWN_START = ("import sys; from trainer.common.timeline import process_start_time; sys.stdin.readline(); "
             "print(repr(process_start_time()), flush=True); sys.stdin.read()")


def test_process_start_time_is_when_the_process_began():
    """A child started between two readings of the clock began between them (to the 10 ms the
    kernel counts in: the start is rounded down); asked about itself (no pid), it says the same."""
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", OWN_START], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    after = time.time()
    try:
        by_pid = process_start_time(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        by_itself = float(child.stdout.readline())  # its own process_start_time(), asked after `after`
    finally:
        child.stdin.close()
        child.wait(timeout=120)
    assert before - 0.05 <= by_pid <= after, (before, by_pid, after)
    assert before - 0.05 <= by_itself <= after, (before, by_itself, after)
    assert abs(by_itself - by_pid) < 0.02
    asked, unknown, answered = time.time(), process_start_time(child.pid), time.time()  # reaped: unknown,
    assert asked <= unknown <= answered  # so now


def test_merge_keeps_the_slowest_worker_and_counts_from_process_start():
    driver = {"process_start": 100.0, "ray_up": 103.0, "training_launched": 104.0, "outputs_written": 130.0}
    workers = [{"worker_started": 106.0, "tensorflow_imported": 110.0, "first_step": 112.0},
               {"worker_started": 105.5, "tensorflow_imported": 111.5, "first_step": 112.5}]
    timeline = merge(driver, workers)
    assert timeline == {"process_start": 0.0, "ray_up": 3.0, "training_launched": 4.0, "worker_started": 5.5,
                        "tensorflow_imported": 11.5, "first_step": 12.5, "outputs_written": 30.0}
    assert list(timeline) == [p for p in POINTS if p in timeline]
    assert format_timeline(timeline).startswith("process_start 0.0s | ray_up 3.0s (+3.0) | training_launched 4.0s (+1.0)")


def test_stderr_to_catches_what_native_code_writes_to_fd_2(tmp_path):
    """TensorFlow's import-time notices are written by C++ to file descriptor 2, not sys.stderr."""
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); from trainer.common.quiet import stderr_to\n"
              "with stderr_to(sys.argv[2]):\n    os.write(2, b'native notice\\n')\n"
              "os.write(2, b'after\\n')")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path / "tf.log")],
                          capture_output=True, timeout=60)
    assert done.stderr == b"after\n"
    assert (tmp_path / "tf.log").read_bytes() == b"native notice\n"


def test_stderr_to_restores_fd_2_when_the_block_raises(tmp_path):
    before = os.fstat(2)
    try:
        with stderr_to(str(tmp_path / "log")):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)


def test_resizes_name_each_change_of_world_size_and_why():
    def epoch(n, world, launch="a", start=None):
        return {"epoch": n, "world_size": world, "launch": launch, "first_step_unix": start or 10.0 * n, "seconds": 2.0}

    history = [epoch(1, 3), epoch(2, 3), epoch(3, 2, start=50.0), epoch(4, 3, start=70.0), epoch(5, 1, launch="b", start=100.0)]
    assert resizes(history) == [
        {"after_epoch": 2, "from": 3, "to": 2, "reason": SHRANK, "at_unix": 50.0, "gap_seconds": 28.0},
        {"after_epoch": 3, "from": 2, "to": 3, "reason": GREW, "at_unix": 70.0, "gap_seconds": 18.0},
        {"after_epoch": 4, "from": 3, "to": 1, "reason": RERUN, "at_unix": 100.0, "gap_seconds": 28.0},
    ]
    assert resizes([epoch(1, 2), epoch(2, 2, launch="b")]) == [] and resizes([]) == []
    assert resizes([{"epoch": 1, "seconds": 1.0, "first_step_unix": 1.0}, epoch(2, 2)]) == []  # an older run's record


def test_a_process_reports_its_own_peak_not_that_of_whoever_started_it():
    """ru_maxrss after fork and exec carries the parent's peak on Linux; the job's figure must not."""
    import subprocess
    import sys

    import numpy as np

    held = np.ones(300 * 2**20, np.uint8)  # 300 MB resident in this process
    child = subprocess.run([sys.executable, "-c", "from trainer.common.timeline import peak_rss_mb; "
                            "print(peak_rss_mb())"], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 150 < held.nbytes / 2**20


def test_an_import_started_on_a_thread_writes_its_notices_to_the_log_and_is_waited_for(tmp_path):
    """import_tensorflow_soon (the driver's, as its Ray goes down), then import_tensorflow (its
    evaluation): TensorFlow's import-time C++ notices went to the process's log file, none to the
    console, and the second call returned the module with its loggers quiet."""
    code = ("import logging, time; from trainer.common import quiet; quiet.import_tensorflow_soon(); time.sleep(0.5); "
            "tf = quiet.import_tensorflow(); "
            "print(tf.get_logger().level == logging.ERROR, logging.getLogger('absl').level == logging.ERROR)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"] and done.stderr == "", done.stderr
    logs = list(tmp_path.glob("mnist-*.log"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0  # TensorFlow's notices, there
