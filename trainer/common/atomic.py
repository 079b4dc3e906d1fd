"""Atomic outputs: write to a temporary name beside the target, then rename over it.

A crash at any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid

from trainer.common.fs import filesystem

MODEL_FILES = ("mnist.keras", "mnist.h5")  # the trained model: Keras 3 native, and the tutorial's HDF5


def temporary_sibling(path: str, kind: str = "tmp") -> str:
    """A hidden, unique name in the same folder as `path` (so a rename into place is atomic), with the
    same extension (Keras picks the format from it). Local paths and object-store keys alike.
    Every write-then-rename in this project names its temporary this way."""
    directory, name = posixpath.split(path.rstrip("/"))
    stem, ext = posixpath.splitext(name)
    return posixpath.join(directory, f".{stem}.{kind}-{uuid.uuid4().hex[:8]}{ext}")


@contextlib.contextmanager
def replacing(path: str):
    """Yield a temporary sibling of `path` to write; when the block succeeds, rename it over `path`.
    Either way the temporary is gone afterwards."""
    tmp = temporary_sibling(os.path.abspath(path))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str, payload: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str, value) -> None:
    write_bytes_atomic(path, json.dumps(value, indent=2).encode())


def save_model_atomic(model, path: str) -> None:
    """model.save to a temporary .keras/.h5 sibling, then rename into place."""
    with replacing(path) as tmp:
        model.save(tmp)


def copy_published(paths: list[str], destination: str) -> None:
    """Copy finished files into `destination` (a local path or a URI such as s3://bucket/run/model),
    in order, each under a temporary name first and then renamed: a reader never sees half a file.
    A folder (the SavedModel) is copied in place. Put metrics.json last: its presence means the
    rest is complete."""
    from pyarrow import fs as pafs


    target_fs, root = filesystem(destination)
    target_fs.create_dir(root, recursive=True)
    for path in paths:
        target = f"{root}/{os.path.basename(path)}"
        if os.path.isdir(path):  # object stores cannot rename folders: metrics.json marks it done
            pafs.copy_files(path, target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=target_fs)
            continue
        tmp = temporary_sibling(target)
        pafs.copy_files(path, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target_fs)
        target_fs.move(tmp, target)
