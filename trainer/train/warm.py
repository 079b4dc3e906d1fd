"""Starting from a trained model (--init-from): find it, check it fits the job's model, read its weights.

    --init-from models/mnist.keras            a file this job (or any Keras 3 code) saved: .keras or .h5
    --init-from store:current --store DIR     the model store's current version (mnist-retrain's store)
    --init-from store:VERSION --store DIR     one version of it

The driver reads the file once, before Ray starts, so a model that does not fit is a one-line error
and not a failed worker. The weights travel to the workers as numpy arrays (trainer/train/worker.py loads
them into the freshly built model before the first step), so no worker needs the file. The RMSprop
slots come along only with --init-optimizer; a .keras file keeps them, an .h5 file does not. The step
count always starts at 0, so the job's own learning-rate schedule runs as configured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from trainer.common import errors, quiet
from trainer.config import Config
from trainer.store.model_store import Store, StoreError

STORE_PREFIX = "store:"
CURRENT = "current"


class InitError(errors.InputError):
    """--init-from names no usable model; the message is one line."""


@dataclass(frozen=True)
class Start:
    """Where training starts: the model file, its store version (if any), and its arrays."""
    path: str
    version: str | None
    weights: list[np.ndarray]
    slots: list[np.ndarray] | None  # the RMSprop slots, with --init-optimizer

    def describe(self) -> dict:
        return {"from": self.path, "version": self.version, "optimizer": self.slots is not None}


def resolve(cfg: Config) -> tuple[str, str | None]:
    """(model file, store version or None) for cfg.init_from; StoreError/InitError if there is none."""
    if not cfg.init_from.startswith(STORE_PREFIX):
        return cfg.init_from, None

    store, wanted = Store(cfg.store), cfg.init_from[len(STORE_PREFIX):]
    store.require()
    vid = store.current_id() if wanted == CURRENT else wanted
    if vid is None:
        raise StoreError(f"--init-from {cfg.init_from}: the store {store.root} has no current version yet")
    store.record(vid)  # a clear error for an unknown id
    return store.model_path(vid), vid


def load(cfg: Config) -> Start:
    """Read cfg.init_from's weights (and slots with --init-optimizer), checked against the job's model."""
    path, version = resolve(cfg)
    if not os.path.isfile(path):
        raise InitError(f"--init-from {path}: no such file")
    quiet.import_tensorflow(cfg.verbose)
    import keras

    from trainer.model.network import build_model

    try:
        source = keras.saving.load_model(path, compile=True)
    except Exception as exc:  # Keras raises many kinds for a file that is not a model
        raise InitError(f"--init-from {path} is not a Keras model ({errors.first_line(exc)})") from None
    target = build_model(cfg)
    check_fits(_shapes(source.trainable_weights), _shapes(target.trainable_weights), path, source.name, target.name)
    weights = [np.asarray(w) for w in source.trainable_weights]
    slots = None
    if cfg.init_optimizer:
        slots = optimizer_slots(source)
        if len(slots) != len(weights) or _shapes(slots) != _shapes(weights):
            raise InitError(f"--init-optimizer: {path} holds no RMSprop state for its weights "
                            "(an .h5 file keeps none; use the .keras file)")
    return Start(os.path.abspath(path), version, weights, slots)


def check_fits(source: list[tuple], target: list[tuple], path: str, source_name: str, target_name: str) -> None:
    """Raise InitError unless the saved model's trainable weight shapes are the job's, in order."""
    if source != target:
        raise InitError(f"--init-from {path} is a {source_name} with weights {_brief(source)}; "
                        f"this job trains a {target_name} with weights {_brief(target)} (see --model)")


def optimizer_slots(model) -> list[np.ndarray]:
    """The optimizer's per-weight variables' values, in weight order."""
    return [np.asarray(v) for v in _slot_variables(model)]


def apply(model, weights: list[np.ndarray], slots: list[np.ndarray] | None) -> None:
    """Load a Start's arrays into a built model (optimizer built too); under a strategy, every replica."""
    for variable, value in zip(model.trainable_variables, weights, strict=True):
        variable.assign(value)
    if slots is not None:
        for variable, value in zip(_slot_variables(model), slots, strict=True):
            variable.assign(value)


def _slot_variables(model) -> list:
    """The optimizer's per-weight variables (RMSprop's velocities), in weight order: every one but
    the scalars (its step count and learning rate)."""
    optimizer = getattr(model, "optimizer", None)
    return [v for v in (optimizer.variables if optimizer else []) if len(v.shape)]


def _shapes(arrays) -> list[tuple]:
    return [tuple(int(d) for d in a.shape) for a in arrays]


def _brief(shapes: list[tuple]) -> str:
    return " ".join("x".join(map(str, s)) for s in shapes)
