"""Atomic outputs: write to a temporary name beside the target, then rename over it.

A crash at any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import uuid


def _temporary_sibling(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(directory, f".{stem}.tmp-{uuid.uuid4().hex[:8]}{ext}")  # Keras wants the ext


def write_json_atomic(path: str, value) -> None:
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model_atomic(model, path: str) -> None:
    """model.save to a temporary .keras/.h5 sibling, then rename into place."""
    tmp = _temporary_sibling(path)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
