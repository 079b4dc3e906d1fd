"""The model store: immutable model versions, a pointer to the current one, and an exclusive lock.

    <store>/versions/<id>/        mnist.keras, mnist.h5, metrics.json, version.json, the evaluation
                                  report and plots; never changed
    <store>/current.json          {"version": <id>, "history": [...]}: temp name, then os.replace
    <store>/lock                  the running retrain: pid, host, start time (see `Store.locked`)
    <store>/staging/<id>/         a run's outputs until registered (one rename into versions/)
    <store>/data/, ray_results/   prepared Parquet shards and Ray Train runs (trainer/retrain.py)

Version ids sort by time: 20261128T020000Z-1a2b3c (UTC start, then 6 random hex digits).
Local paths only, shared mounts (NFS) included: the lock needs an atomic create-if-absent and the
pointer an atomic rename, which object stores reached through pyarrow.fs do not offer.
Pure Python; nothing here knows about Ray, TensorFlow or Keras.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
import threading
from datetime import datetime, timezone

from trainer.config import RESULT, WEIGHTS, fields_shaping
from trainer.outputs import write_json_atomic

VERSIONS, STAGING, TRASH, DATA, RUNS = "versions", "staging", ".trash", "data", "ray_results"
POINTER, LOCK, RECORD = "current.json", "lock", "version.json"
MODEL_FILES = ("mnist.keras", "mnist.h5", "metrics.json")
PASSED, REJECTED, FAILED = "passed", "rejected", "failed"  # a version's gate decision, fixed at birth
VERSION_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
HEARTBEAT_S = 30.0  # how often the holder touches the lock, so other hosts can tell it is alive
STALE_AFTER_S = 600.0  # a lock we cannot check by pid is stale after this long without a heartbeat
ACCURACY_SLACK = 1e-9  # accuracies are float32 fractions; equal must compare equal after subtraction
# What a model learns from, besides the data's content: the fields marked so in Config. Where and
# how a run executes (paths, the cluster, logging, the source's path) is no reason to retrain.
LEARNED_FROM = fields_shaping(WEIGHTS, RESULT)


class StoreError(RuntimeError):
    """The store is missing, corrupt, or refuses the operation. The message is one line."""


class LockHeld(StoreError):
    """Another retraining run holds the store's lock."""


# ---------------------------------------------------------------------------- pure helpers

def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_version_id(now: datetime | None = None) -> str:
    return f"{(now or utc_now()).astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def gate(accuracy: float, baseline: float | None, tolerance: float,
         min_accuracy: float) -> tuple[bool, str]:
    """(promote?, why): at least the floor, and at least the current model's accuracy - tolerance."""
    if accuracy + ACCURACY_SLACK < min_accuracy:
        return False, f"test accuracy {accuracy:.4f} is below the floor {min_accuracy:.4f} (--min-accuracy)"
    if baseline is None:
        return True, f"test accuracy {accuracy:.4f} >= floor {min_accuracy:.4f}; there was no current model"
    if accuracy + ACCURACY_SLACK < baseline - tolerance:
        return False, (f"test accuracy {accuracy:.4f} is more than {tolerance:.4f} (--tolerance) below "
                       f"the current model's {baseline:.4f}")
    return True, (f"test accuracy {accuracy:.4f} >= current {baseline:.4f} - {tolerance:.4f} "
                  f"and >= floor {min_accuracy:.4f}")


def fingerprint(config: dict, data_sha256: str) -> dict:
    """What a model is a function of: the data's content and the recipe (not where it ran)."""
    return {"data_sha256": data_sha256,
            "config": {k: v for k, v in sorted(config.items()) if k in LEARNED_FROM}}


def status_of(record: dict, pointer: dict | None) -> str:
    """current, promoted earlier, rejected, failed, or not promoted (passed, then a crash)."""
    vid = record.get("version")
    if pointer and pointer.get("version") == vid:
        return "current"
    if record.get("decision") in (REJECTED, FAILED):
        return record["decision"]
    if any(entry.get("version") == vid for entry in (pointer or {}).get("history", [])):
        return "promoted earlier"
    return "not promoted"


# ---------------------------------------------------------------------------- the store

class Store:
    def __init__(self, root: str):
        if "://" in root:
            raise StoreError(f"--store {root!r}: the model store must be a local or mounted directory "
                             "(its lock and pointer need atomic create and rename, which object "
                             "stores lack); use --storage-path for Ray's checkpoints in object storage")
        self.root = os.path.abspath(root)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def version_dir(self, vid: str) -> str:
        return self.path(VERSIONS, vid)

    def model_path(self, vid: str, name: str = "mnist.keras") -> str:
        return self.path(VERSIONS, vid, name)

    def create(self) -> None:
        for folder in (VERSIONS, STAGING):
            os.makedirs(self.path(folder), exist_ok=True)

    def require(self) -> None:
        if not os.path.isdir(self.path(VERSIONS)):
            raise StoreError(f"{self.root} is not a model store (no {VERSIONS}/ folder); "
                             "a first retraining run creates it")

    # -- versions

    def version_ids(self) -> list[str]:
        """Registered versions, oldest first (ids sort by time)."""
        try:
            names = os.listdir(self.path(VERSIONS))
        except FileNotFoundError:
            return []
        return sorted(name for name in names if VERSION_ID.match(name))

    def record(self, vid: str) -> dict:
        path = self.path(VERSIONS, vid, RECORD)
        if not VERSION_ID.match(vid):
            raise StoreError(f"{vid!r} is not a version id (like 20261128T020000Z-1a2b3c); see --list")
        try:
            with open(path) as f:
                record = json.load(f)
        except FileNotFoundError:
            raise StoreError(f"version {vid} is not in {self.path(VERSIONS)}; see --list") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(record, dict):
            raise StoreError(f"{path} is not a version record")
        return record

    def records(self) -> list[dict]:
        return [self.record(vid) for vid in self.version_ids()]

    def new_staging(self, vid: str) -> str:
        staging = self.path(STAGING, vid)
        os.makedirs(staging)
        return staging

    def register(self, vid: str, record: dict) -> str:
        """Write version.json into staging/<vid>, then rename it to versions/<vid> in one step."""
        staging = self.path(STAGING, vid)
        write_json_atomic(os.path.join(staging, RECORD), record)
        target = self.version_dir(vid)
        os.rename(staging, target)  # a version appears whole or not at all
        _fsync_dir(self.path(VERSIONS))
        return target

    def register_failure(self, vid: str, record: dict) -> str:
        """Record a run that did not finish: version.json only (partial outputs are discarded)."""
        staging = self.path(STAGING, vid)
        if os.path.exists(staging):
            self._discard(staging)
        os.makedirs(staging)
        return self.register(vid, record)

    def clean_staging(self) -> list[str]:
        """Remove what crashed runs left in staging/. Call only while holding the lock."""
        try:
            names = sorted(os.listdir(self.path(STAGING)))
        except FileNotFoundError:
            return []
        for name in names:
            self._discard(self.path(STAGING, name))
        return names

    # -- the current pointer

    def pointer(self, promoting: str | None = None) -> dict | None:
        """current.json, checked; None for a store that never promoted. Raises StoreError if corrupt.

        `promoting`: a version being promoted now, which has no pointer yet on a store's first promotion.
        """
        path = self.path(POINTER)
        fix = "nothing was changed: repair it, or choose a version with --rollback VERSION --force"
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            promoted = [r["version"] for r in self.records()
                        if r.get("decision") == PASSED and r.get("version") != promoting]
            if promoted:
                raise StoreError(f"{path} is missing although versions passed the gate (newest "
                                 f"{promoted[-1]}); {fix}") from None
            return None
        except OSError as exc:
            raise StoreError(f"{path} is unreadable ({exc}); {fix}") from None
        try:
            pointer = json.loads(text)
        except ValueError:
            pointer = None
        vid = pointer.get("version") if isinstance(pointer, dict) else None
        if not isinstance(vid, str):
            raise StoreError(f"{path} is corrupt (not JSON naming a version); {fix}")
        if not VERSION_ID.match(vid) or not os.path.isfile(self.path(VERSIONS, vid, RECORD)):
            raise StoreError(f"{path} points at version {vid!r}, which is not in "
                             f"{self.path(VERSIONS)}; {fix}")
        return pointer

    def current_id(self) -> str | None:
        pointer = self.pointer()
        return pointer["version"] if pointer else None

    def current_model(self, name: str = "mnist.keras") -> str:
        """The current model's file, for readers (one atomic read of the pointer)."""
        vid = self.current_id()
        if vid is None:
            raise StoreError(f"{self.root} has no current version yet")
        return self.model_path(vid, name)

    def promote(self, vid: str) -> None:
        self._point_at(vid, "promote", self.pointer(promoting=vid))

    def rollback(self, vid: str, force: bool = False) -> str | None:
        """Point current at an earlier version; return the version it replaced (None if none).

        A rejected version needs force. With force, a corrupt or missing pointer is replaced (the
        broken file is kept beside it as current.json.broken-<time>).
        """
        record = self.record(vid)
        if record.get("decision") == FAILED:
            raise StoreError(f"version {vid} failed to train and has no model; choose another (--list)")
        if record.get("decision") == REJECTED and not force:
            raise StoreError(f"version {vid} was rejected ({record.get('reason')}); "
                             "pass --force to roll back to it anyway")
        missing = [n for n in MODEL_FILES if not os.path.isfile(self.model_path(vid, n))]
        if missing:
            raise StoreError(f"version {vid} lacks {', '.join(missing)}; choose another (--list)")
        try:
            previous = self.pointer()
        except StoreError:
            if not force:
                raise
            previous = None
            if os.path.exists(self.path(POINTER)):
                os.replace(self.path(POINTER),
                           self.path(f"{POINTER}.broken-{utc_now():%Y%m%dT%H%M%SZ}"))
        self._point_at(vid, "rollback", previous)
        return previous["version"] if previous else None

    def _point_at(self, vid: str, action: str, previous: dict | None) -> None:
        entry = {"version": vid, "at": iso(utc_now()), "action": action}
        history = list((previous or {}).get("history", [])) + [entry]
        write_json_atomic(self.path(POINTER), {"version": vid, "updated": entry["at"],
                                               "action": action, "history": history})
        _fsync_dir(self.root)

    # -- pruning

    def prune(self, keep: int) -> list[str]:
        """Remove the oldest versions that are not current until `keep` remain; return their ids.

        Their Ray Train runs under ray_results/ go too, and prepared data no kept version uses.
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        current = self.current_id()
        ids = self.version_ids()
        doomed = [vid for vid in ids if vid != current][:max(0, len(ids) - keep)]
        for vid in doomed:
            self._discard(self.version_dir(vid))
            if os.path.isdir(self.path(RUNS, vid)):
                self._discard(self.path(RUNS, vid))
        self._prune_data()
        return doomed

    def _prune_data(self) -> None:
        try:
            names = os.listdir(self.path(DATA))
        except FileNotFoundError:
            return
        used = {os.path.abspath(r.get("data", {}).get("path") or "/") for r in self.records()}
        for name in names:
            if not name.startswith(".") and self.path(DATA, name) not in used:
                self._discard(self.path(DATA, name))

    def _discard(self, path: str) -> None:
        """Rename out of sight first, so no half-deleted version is ever listed; then delete."""
        os.makedirs(self.path(TRASH), exist_ok=True)
        aside = self.path(TRASH, f"{os.path.basename(path)}-{secrets.token_hex(4)}")
        os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)

    # -- the lock

    @contextlib.contextmanager
    def locked(self):
        """Hold the store's lock for the block, or raise LockHeld if a live run holds it.

        Yields the lock record (pid, hostname, started, ...; "took_over" names a stale holder).
        The lock appears whole: a written temp file hard-linked to `lock`, which like O_EXCL
        fails if the name exists (and is the NFS-safe form of it). A lock is stale when its
        process is gone (same machine: pid, start time and boot id are checked) or, when that
        cannot be checked (another host), after STALE_AFTER_S without a heartbeat.
        """
        os.makedirs(self.root, exist_ok=True)
        path = self.path(LOCK)
        owner = acquire(path)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(path, owner["token"], stop), daemon=True)
        beat.start()
        try:
            yield owner
        finally:
            stop.set()
            beat.join()
            release(path, owner["token"])


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a crash right after must not bring the old name back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- lock internals

def acquire(path: str) -> dict:
    me = _lock_record()
    tmp = f"{path}.{me['token']}.tmp"
    with open(tmp, "w") as f:
        json.dump(me, f)
        f.flush()
        os.fsync(f.fileno())
    try:
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
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "boot_id": _boot_id(),
            "proc_start": stat[1] if stat else None, "started": iso(utc_now()),
            "token": secrets.token_hex(8), "command": " ".join(sys.argv)[:300]}


def _held_message(path: str, holder: dict, age: float) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('hostname', '?')}, since {holder.get('started', '?')}"
    if holder.get("hostname") == socket.gethostname() and holder.get("boot_id") == _boot_id():
        return f"another retraining run holds {path} ({who})"
    return (f"another retraining run holds {path} ({who}; last heartbeat {age:.0f} s ago, "
            f"taken over after {STALE_AFTER_S:.0f} s without one)")


def _alive(pid: int, proc_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: the pid exists, which is all we can tell
    state, start = stat
    # A zombie is dead (killed, not yet reaped); another start time means the pid was reused.
    return state != "Z" and (proc_start is None or start == proc_start)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None
