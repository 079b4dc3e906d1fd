"""Storage faults made real with Linux mounts: a full disk (a small tmpfs), a read-only directory (a
read-only bind mount) and a mount that vanishes mid-run (a lazy unmount), under --output,
--storage-path and a retraining --store. Each ends in one line naming the path and the cause, exit
1, no temporary file left behind, and a store's current.json unmoved. Skips, saying why, where this
process cannot mount (not root, or no mount namespace rights)."""

import contextlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SAMPLE, job_env, run_job, start_job

pytestmark = pytest.mark.ray  # every test here runs the job or starts Ray

SMALL = ["--data", str(SAMPLE), "--epochs", "2"]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True, timeout=30)


def _umount(path, lazy: bool = False) -> None:
    subprocess.run(["umount", *(["-l"] if lazy else []), str(path)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    probe = tmp_path_factory.mktemp("mount-probe")
    try:
        _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount here ({getattr(exc, 'stderr', '') or exc}); storage faults need root on Linux")
    _umount(probe)


@contextlib.contextmanager
def tmpfs(path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(path):
    """`path` as a read-only bind mount of a folder of its own (root ignores permission bits)."""
    source = path.parent / f"{path.name}-source"
    source.mkdir(parents=True)
    path.mkdir(parents=True)
    _mount("--bind", str(source), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _umount(path)


def files_under(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names)


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flag", ["--output", "--storage-path"])
def test_a_read_only_directory_fails_in_seconds_before_any_work(tmp_path, can_mount, flag):
    with read_only(tmp_path / "ro") as place:
        others = {"--output": str(tmp_path / "out"), "--storage-path": str(tmp_path / "runs"), flag: str(place)}
        proc = run_job(*SMALL, *[x for pair in others.items() for x in pair], timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert last_line(proc) == f"error: {flag} {place}: cannot write there (Read-only file system)"
        assert "Traceback" not in proc.stderr and "epoch 1/" not in proc.stdout
    assert not (tmp_path / "runs" / "_prepared_data").exists()


def test_a_full_storage_path_fails_while_preparing_the_data_and_leaves_no_half_written_shards(tmp_path, can_mount):
    with tmpfs(tmp_path / "full", "256k") as place:
        proc = run_job(*SMALL, "--output", str(tmp_path / "out"), "--storage-path", str(place), timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert last_line(proc) == (f"error: --storage-path {place}: writing the prepared data failed "
                                   "(No space left on device)")
        assert files_under(place) == []  # the shards' temporary folder went with the failure
    assert "Traceback" not in proc.stderr


def test_a_full_output_disk_fails_when_the_model_is_written_and_leaves_no_temporary_file(tmp_path, can_mount):
    """The probe's 4 KB fit; the 4.8 MB model does not, after training."""
    with tmpfs(tmp_path / "full", "64k") as place:
        proc = run_job(*SMALL, "--output", str(place), "--storage-path", str(tmp_path / "runs"))
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert last_line(proc) == (f"error: --output {place}: writing the model and reports failed "
                                   "(No space left on device)")
        assert files_under(place) == []
    assert "epoch 2/2" in proc.stdout and "Traceback" not in proc.stderr


def test_an_output_mount_that_vanishes_mid_run_is_noticed_and_nothing_is_written_below_it(tmp_path, can_mount):
    """A lazy unmount after epoch 1 leaves the mount point as a plain folder on the disk below,
    where writing would succeed, silently, in the wrong place."""
    place = tmp_path / "mnt"
    with tmpfs(place, "64m"):
        proc = start_job(*SMALL, "--epochs", "6", "--batch-size", "32", "--output", str(place),
                         "--storage-path", str(tmp_path / "runs"))
        for line in proc.stdout:
            if line.startswith("epoch 1/"):
                _umount(place, lazy=True)
                break
        out, err = proc.communicate(timeout=420)
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"error: --output {place} is no longer the filesystem it was when the "
                                            "run started (its mount was lost?); nothing written there")
    assert files_under(place) == []


def retrain(store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "retrain.py"), "--store", str(store), *SMALL, *args],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)


def test_a_full_store_fails_in_one_line_and_moves_nothing(tmp_path, can_mount):
    """A store with a current version whose disk then fills up: the next cycle ends at once, before
    the lock, with one line (it was a 25-line traceback from the lock), and leaves every file as it
    was: current.json unmoved, no lock, no temporary file."""
    with tmpfs(tmp_path / "store", "64m") as store:
        first = retrain(store, "--min-accuracy", "0.5")  # 2 epochs on the sample: about 0.88
        assert first.returncode == 0 and "promoted" in first.stdout, first.stderr[-3000:]
        pointer = (store / "current.json").read_bytes()
        before = files_under(store)
        with open(store / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        proc = retrain(store, "--force", "--min-accuracy", "0.5")
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [
            f"error: --store {store}: cannot write there (No space left on device)"]
        assert (store / "current.json").read_bytes() == pointer
        assert files_under(store) == sorted([*before, "filler"])
        assert json.loads(pointer)["version"] in first.stdout
