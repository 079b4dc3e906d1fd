"""The run timeline (trainer/timeline.py) and the quiet console's pieces (trainer/quiet.py)."""

import os
import subprocess
import sys
import time

from tests.conftest import ROOT
from trainer.quiet import stderr_to
from trainer.timeline import POINTS, format_timeline, merge, process_start_time


def test_process_start_time_is_when_the_process_began():
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        started = process_start_time(child.pid)
    finally:
        child.kill()
        child.wait()
    assert before - 0.05 <= started <= time.time()
    assert process_start_time() <= time.time() and process_start_time("no-such-pid") > before


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
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); from trainer.quiet import stderr_to\n"
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
