"""A trained model by reference: a Keras file, or an MLflow model URI (models:/mnist@champion,
runs:/<run id>/model), checked to be an MNIST model. MLflow is imported only for a URI."""

from __future__ import annotations

import os

from trainer.common import errors
from trainer.common.errors import InputError
from trainer.model.images import FIELD
from trainer.track.connection import require

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")  # what keras.saving.load_model accepts
MLFLOW_SCHEMES = ("models:/", "runs:/")  # an MLflow model (trainer/track/)


def load_model(path: str, tracking_uri: str | None = None):
    """The model, or an InputError with a one-line reason (missing, unreadable, wrong shape)."""
    if path.startswith(MLFLOW_SCHEMES):
        return _checked(path, load_keras(path, tracking_uri))
    if not os.path.isfile(path):
        raise InputError(f"model file {path!r} not found; train one first (it is written to models/mnist.keras)")
    if not path.endswith(MODEL_SUFFIXES):  # Keras picks the loader by suffix; say so in our words
        raise InputError(f"{path}: not a Keras model file (expected .keras, .h5 or .hdf5)")
    import keras

    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)  # compile: only predicting
    except Exception as exc:  # corrupt zip, wrong format, unsafe lambda...: all mean "not a model"
        raise InputError(f"{path}: not a loadable Keras model ({errors.first_line(exc, named=True, limit=160)})") from None
    return _checked(path, model)


def _checked(path: str, model):
    if tuple(model.input_shape) != (None, FIELD * FIELD) or tuple(model.output_shape) != (None, 10):
        raise InputError(f"{path}: model maps {model.input_shape} -> {model.output_shape}, "
                         "expected an MNIST model (None, 784) -> (None, 10)")
    return model


def load_keras(model_uri: str, tracking: str | None = None):
    """The Keras model at an MLflow URI (models:/mnist@champion, runs:/<id>/model), from
    `tracking` or $MLFLOW_TRACKING_URI; an InputError with a one-line reason."""
    uri = tracking or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise InputError(f"{model_uri} is in an MLflow registry: give --tracking-uri or set MLFLOW_TRACKING_URI")
    mlflow = require(uri)
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.keras.load_model(model_uri)
    except Exception as exc:
        raise InputError(f"{model_uri} at {uri}: {errors.first_line(exc, limit=200)}") from None
