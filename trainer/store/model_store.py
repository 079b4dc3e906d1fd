"""The model store: immutable model versions, a pointer to the current one, under an exclusive lock.

    <store>/versions/<id>/        mnist.keras, mnist.h5, metrics.json, version.json, the evaluation
                                  report and plots; never changed
    <store>/current.json          {"version": <id>, "history": [...]}: temp name, then os.replace
    <store>/lock                  the running retrain: pid, host, start time (see `Store.locked`)
    <store>/staging/<id>/         a run's outputs until registered (one rename into versions/)
    <store>/data/, ray_results/   prepared Parquet shards and Ray Train runs (trainer/promote/retrain.py)

Version ids sort by time: 20261128T020000Z-1a2b3c (UTC start, then 6 random hex digits).
Local paths only, shared mounts (NFS) included: the lock needs an atomic create-if-absent and the
pointer an atomic rename, which object stores reached through pyarrow.fs do not offer.
Pure Python; nothing here knows about Ray, TensorFlow or Keras.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil

from trainer.common import errors
from trainer.common.atomic import MODEL_FILES, write_json_atomic
from trainer.common.clock import iso, utc_now
from trainer.common.lock import held
from trainer.store.record import VersionRecord
from trainer.store.versions import NO_MODEL, PASSED, REJECTED, VERSION_ID

VERSIONS, STAGING, TRASH, DATA, RUNS = "versions", "staging", ".trash", "data", "ray_results"
POINTER, LOCK, RECORD = "current.json", "lock", "version.json"
VERSION_FILES = (*MODEL_FILES, "metrics.json")  # what a registered version must hold


class StoreError(errors.StoreError):
    """The store is missing, corrupt, or refuses the operation. The message is one line."""


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

    def record(self, vid: str) -> VersionRecord:
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
        try:
            return VersionRecord.from_json(record)
        except ValueError as exc:
            raise StoreError(f"{path} is {exc}") from None

    def records(self) -> list[VersionRecord]:
        return [self.record(vid) for vid in self.version_ids()]

    def new_staging(self, vid: str) -> str:
        staging = self.path(STAGING, vid)
        os.makedirs(staging)
        return staging

    def register(self, record: VersionRecord) -> str:
        """Write version.json into staging/<vid>, then rename it to versions/<vid> in one step."""
        vid = record.version
        staging = self.path(STAGING, vid)
        write_json_atomic(os.path.join(staging, RECORD), record.to_json())
        target = self.version_dir(vid)
        os.rename(staging, target)  # a version appears whole or not at all
        _fsync_dir(self.path(VERSIONS))
        return target

    def register_failure(self, record: VersionRecord) -> str:
        """Record a run that did not finish, or was refused: version.json only (partial outputs are discarded)."""
        staging = self.path(STAGING, record.version)
        if os.path.exists(staging):
            self._discard(staging)
        os.makedirs(staging)
        return self.register(record)

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
            promoted = [r.version for r in self.records() if r.decision == PASSED and r.version != promoting]
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
        if record.decision in NO_MODEL:
            raise StoreError(f"version {vid} {record.decision} to train and has no model; choose another (--list)")
        if record.decision == REJECTED and not force:
            raise StoreError(f"version {vid} was rejected ({record.reason}); "
                             "pass --force to roll back to it anyway")
        missing = [n for n in VERSION_FILES if not os.path.isfile(self.model_path(vid, n))]
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
        used = {os.path.abspath(r.data.get("path") or "/") for r in self.records()}
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
        """Hold the store's lock (trainer/common/lock.py) for the block, or raise LockHeld if a live run
        holds it. Yields the lock record (pid, hostname, started; "took_over" names a stale holder)."""
        os.makedirs(self.root, exist_ok=True)
        with held(self.path(LOCK)) as owner:
            yield owner


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a crash right after must not bring the old name back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
