"""A cross-host exclusive lock on a shared directory (local disk or NFS), with a heartbeat.

The lock appears whole: a written temp file hard-linked to its name, which like O_EXCL fails if the
name exists (and is the NFS-safe form of it). A lock is stale when its process is gone (same machine:
pid, start time and boot id are checked) or, when that cannot be checked (another host), after
STALE_AFTER_S without a heartbeat. Stock file locks (fcntl) do not detect a stale owner on NFS.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import sys
import threading

import psutil

from trainer.common import errors
from trainer.common.clock import iso, utc_now

HEARTBEAT_S = 30.0  # how often the holder touches the lock, so other hosts can tell it is alive
STALE_AFTER_S = 600.0  # a lock we cannot check by pid is stale after this long without a heartbeat


class LockHeld(errors.JobError, RuntimeError):
    """Another live process holds the lock. The message says who, where and since when."""


@contextlib.contextmanager
def held(path: str):
    """Hold the lock at `path` for the block, or raise LockHeld if a live process holds it.

    Yields the lock record (pid, hostname, started, ...; "took_over" names a stale holder)."""
    owner = acquire(path)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, owner["token"], stop), daemon=True)
    beat.start()
    try:
        yield owner
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):  # a store whose mount is gone: the block's error says why
            release(path, owner["token"])


def acquire(path: str) -> dict:
    me = _lock_record()
    tmp = f"{path}.{me['token']}.tmp"
    try:
        with open(tmp, "w") as f:  # a full disk fails here: the finally removes the half-written file
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        for _ in range(3):  # retried after a stale lock is taken over or a holder just released
            try:
                os.link(tmp, path)
                return me
            except FileExistsError:
                pass
            holder, age = read_lock(path)
            if holder is None:
                continue
            if not is_stale(holder, age):
                raise LockHeld(_held_message(path, holder, age))
            if _take_over(path, holder):
                me["took_over"] = holder
        raise LockHeld(f"{path} keeps changing hands; another retraining run is starting")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def release(path: str, token: str) -> None:
    holder, _ = read_lock(path)
    if holder is not None and holder.get("token") == token:  # never remove a lock we lost
        os.remove(path)


def read_lock(path: str) -> tuple[dict | None, float]:
    """(the lock's record, or {} if unreadable; seconds since its last heartbeat). (None, 0) if absent."""
    try:
        with open(path) as f:
            text = f.read()
        age = utc_now().timestamp() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None, 0.0
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), age


def is_stale(holder: dict, age: float) -> bool:
    if (holder.get("hostname") == socket.gethostname() and holder.get("boot_id") == _boot_id()
            and isinstance(holder.get("pid"), int)):
        return not _alive(holder["pid"], holder.get("proc_start"))
    return age > STALE_AFTER_S  # another machine (or this one before a reboot): trust the heartbeat


def _take_over(path: str, holder: dict) -> bool:
    with open(f"{path}.takeover", "a") as guard:
        # One taker at a time: two could otherwise each delete the lock the other just made.
        fcntl.flock(guard, fcntl.LOCK_EX)
        again, _ = read_lock(path)
        if again is None or again.get("token") != holder.get("token"):
            return False
        os.remove(path)
        return True


def _heartbeat(path: str, token: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        holder, _ = read_lock(path)
        if holder is not None and holder.get("token") == token:
            with contextlib.suppress(OSError):
                os.utime(path)


def _lock_record() -> dict:
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "boot_id": _boot_id(),
            "proc_start": psutil.Process().create_time(), "started": iso(utc_now()),
            "token": secrets.token_hex(8), "command": " ".join(sys.argv)[:300]}


def _held_message(path: str, holder: dict, age: float) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('hostname', '?')}, since {holder.get('started', '?')}"
    if holder.get("hostname") == socket.gethostname() and holder.get("boot_id") == _boot_id():
        return f"another retraining run holds {path} ({who})"
    return (f"another retraining run holds {path} ({who}; last heartbeat {age:.0f} s ago, "
            f"taken over after {STALE_AFTER_S:.0f} s without one)")


def _alive(pid: int, proc_start: float | None) -> bool:
    """Is the lock's holder still running? A zombie is dead (killed, not yet reaped); another start
    time means the pid was reused. A lock written before psutil kept clock ticks, not a time: the pid
    alone then decides."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return not isinstance(proc_start, float) or process.create_time() == proc_start
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # alive, another user's


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None
