"""Training state on disk: weights, RMSprop slots, epoch, config and per-epoch history.

A checkpoint is a directory: `state.npz` (model weights, then optimizer variables),
`meta.json` (epochs done, config, history) and `workers/rank-<r>.json` (what each worker saw).
Pure Keras + numpy; Ray only moves these directories around.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from trainer.common import errors

STATE = "state.npz"
# What reading a checkpoint's files raises when they are missing, truncated or not what they claim
# (zip CRC and header errors, JSON errors, a missing array). Anything else is a bug, and propagates.
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)
META = "meta.json"
WORKERS = "workers"


class CheckpointError(errors.TrainingError):
    """A checkpoint is missing, truncated or does not fit the model. The message names it."""


def save(directory: str, model, epochs_done: int, config: dict, history: list[dict]) -> None:
    """Write the model's weights and optimizer state plus metadata into `directory`."""
    os.makedirs(directory, exist_ok=True)
    arrays = {f"w{i:04d}": np.asarray(v) for i, v in enumerate(model.get_weights())}
    arrays.update({f"o{i:04d}": np.asarray(v) for i, v in enumerate(_optimizer_variables(model))})
    np.savez(os.path.join(directory, STATE), **arrays)
    meta = {"epochs_done": epochs_done, "config": config, "history": history}
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=2)


def load(directory: str, model) -> dict:
    """Restore weights and optimizer state into a built model; return the metadata.

    The optimizer must already be built (`model.optimizer.build(model.trainable_variables)`).
    """
    meta_path, state_path = os.path.join(directory, META), os.path.join(directory, STATE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with np.load(state_path, allow_pickle=False) as npz:
            weights = [npz[k] for k in sorted(k for k in npz.files if k.startswith("w"))]
            slots = [npz[k] for k in sorted(k for k in npz.files if k.startswith("o"))]
    except UNREADABLE as exc:
        raise _unreadable(directory, exc) from exc
    variables = _optimizer_variables(model)
    if len(weights) != len(model.weights) or len(slots) != len(variables):
        raise CheckpointError(
            f"checkpoint {directory} holds {len(weights)} weights and {len(slots)} optimizer "
            f"variables; the model has {len(model.weights)} and {len(variables)}")
    for variable, value in zip(list(model.weights) + variables, weights + slots):
        if tuple(variable.shape) != value.shape:
            raise CheckpointError(f"checkpoint {directory}: {variable.path} has shape {value.shape}, "
                                  f"the model expects {tuple(variable.shape)}")
        variable.assign(value)
    return meta


def verify(directory: str) -> dict:
    """Read every array and the metadata of a checkpoint (zip CRCs catch truncation); return meta."""
    try:
        with np.load(os.path.join(directory, STATE), allow_pickle=False) as npz:
            for key in npz.files:
                npz[key]
    except UNREADABLE as exc:
        raise _unreadable(directory, exc) from exc
    return read_meta(directory)


def _unreadable(directory: str, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {directory} is unreadable ({type(exc).__name__}: {str(exc)[:160]}); "
        "nothing was overwritten: pass --force to move the run aside and start over")


def read_meta(directory: str) -> dict:
    try:
        with open(os.path.join(directory, META)) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory} has no readable {META} ({exc})") from exc


def write_worker_info(directory: str, rank: int, info: dict) -> None:
    os.makedirs(os.path.join(directory, WORKERS), exist_ok=True)
    with open(os.path.join(directory, WORKERS, f"rank-{rank}.json"), "w") as f:
        json.dump(info, f)


def read_worker_info(directory: str) -> list[dict]:
    folder = os.path.join(directory, WORKERS)
    if not os.path.isdir(folder):
        return []
    infos = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            infos.append(json.load(f))
    return sorted(infos, key=lambda info: info["rank"])


def _optimizer_variables(model) -> list:
    return list(model.optimizer.variables)
