"""Where a run writes on local disk (--output, --storage-path, --store), checked before any work and
again before the outputs are written; a fault there is one line that names the path and the cause.

A full disk, a read-only directory and a mount that vanished all surface as OSError somewhere deep
(h5py, pyarrow, the lock). `Place.check` finds the first two before any data or training work;
`Place.unchanged` finds the third before anything is written: an NFS or tmpfs mount that went away
leaves its mount point as a plain folder on the disk below, where a write would succeed, silently,
in the wrong place.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from trainer.common import errors
from trainer.common.errors import StorageError


def cause(exc: BaseException) -> str:
    """An OSError's reason in a few words ('No space left on device'), also from pyarrow's wording
    ('Error writing bytes to file. Detail: [errno 28] ...'), else its first line."""
    text = ((exc.strerror if isinstance(exc, OSError) else None) or str(exc)).strip()
    code = re.search(r"\[errno (\d+)\]", text, re.IGNORECASE)
    if code:
        return os.strerror(int(code.group(1)))
    return errors.first_line(text) if text else type(exc).__name__


def describe(exc: OSError) -> str:
    """An OSError no check named, in one line: its path, if it has one, and its cause."""
    return f"{exc.filename + ': ' if exc.filename else ''}{cause(exc)}"


@dataclass(frozen=True)
class Place:
    flag: str  # the option that named it, for the message
    path: str
    device: int  # st_dev of the folder when checked: another one later means the mount changed

    @classmethod
    def check(cls, flag: str, path: str) -> "Place":
        """Create `path` if needed and write, sync and remove a probe file in it: a read-only or full
        disk fails here, in a second, with StorageError."""
        path = os.path.abspath(path)
        probe = os.path.join(path, f".write-check-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(path, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"{flag} {path}: cannot write there ({cause(exc)})") from None
        finally:
            if os.path.exists(probe):
                os.remove(probe)
        return cls(flag, path, os.stat(path).st_dev)

    def unchanged(self) -> None:
        """StorageError if the folder is gone, or is now on another filesystem than when checked."""
        try:
            device = os.stat(self.path).st_dev
        except OSError as exc:
            raise StorageError(f"{self.flag} {self.path} is gone ({cause(exc)}); was its mount lost?") from None
        if device != self.device:
            raise StorageError(f"{self.flag} {self.path} is no longer the filesystem it was when the run "
                               "started (its mount was lost?); nothing written there")



@contextlib.contextmanager
def writing(place: Place | None, doing: str):
    """An OSError in the block becomes the one-line StorageError naming `place` and what was being
    done there; with no place (an object store's URI, not checked) it passes on unchanged."""
    try:
        yield
    except OSError as exc:
        if place is None:
            raise
        raise StorageError(f"{place.flag} {place.path}: {doing} failed ({cause(exc)})") from None


def local(path: str | None) -> bool:
    return bool(path) and "://" not in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path within it, for local paths and URIs (s3://, gs://...)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def move_aside(path: str) -> str | None:
    """--force's way with an earlier run or search: `path` (local or URI) renamed to
    <path>.replaced-<time>, never deleted; that new path, or None where nothing was there."""
    fs, target = filesystem(path)
    if fs.get_file_info(target).type == pafs.FileType.NotFound:
        return None
    suffix = f".replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    fs.move(target, target + suffix)
    return path + suffix


def read_json(path: str, default=None):
    """The JSON document at `path` (local or URI), or `default` if it is missing or unreadable."""
    fs, target = filesystem(path)
    try:
        with fs.open_input_stream(target) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return default


def write_json(path: str, value) -> None:
    """`value` as JSON at `path` (local or URI), its folder made if missing; replaced whole."""
    fs, target = filesystem(path)
    fs.create_dir(posixpath.dirname(target), recursive=True)
    with fs.open_output_stream(target) as f:
        f.write(json.dumps(value, indent=2).encode())


def join(base: str, *parts: str) -> str:
    """os.path.join for local paths, '/'-joins for URIs."""
    return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)
