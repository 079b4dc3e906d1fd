"""The canary: load a candidate model in a fresh process, the way a server would, before it is promoted.

The process shares nothing with the trainer's: no imported modules, no registered objects, and not
even the `trainer` package on its path (the program runs with `python -c` in an empty folder). It
loads the version's mnist.keras, and its SavedModel when one was exported, predicts a fixed slice of
the test images prepared as mnist-predict prepares them, and hands back the probabilities. `check` compares them with the
trainer's: the same digit for every image and the probabilities within PROBABILITY_TOLERANCE.

    check(version_dir, x_test[:IMAGES], trainer_probs[:IMAGES])   # raises CanaryError, or returns the figures

The trainer side imports only the standard library and numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from trainer.common import errors

IMAGES = 512  # the fixed slice: the first test images
PROBABILITY_TOLERANCE = 1e-5  # float32 inference of the same weights on the same machine
TIMEOUT_S = 300  # a load that hangs is a failed canary, not a hung cycle
KERAS_FILE, SAVEDMODEL = "mnist.keras", "mnist_savedmodel"


class CanaryError(errors.JobError, RuntimeError):
    """The candidate failed to load or predicted differently in a fresh process. One line."""


def check(version_dir: str, images: np.ndarray, expected: np.ndarray, python: str | None = None) -> dict:
    """Run the canary on `version_dir`'s model files; return {"seconds", "images", "formats",
    "max_difference"}. `images`: uint8 (n, 28, 28); `expected`: the trainer's (n, 10) probabilities."""
    formats = [name for name in (KERAS_FILE, SAVEDMODEL) if os.path.exists(os.path.join(version_dir, name))]
    if KERAS_FILE not in formats:
        raise CanaryError(f"canary: {os.path.join(version_dir, KERAS_FILE)} is missing")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mnist-canary-") as tmp:
        np.save(os.path.join(tmp, "images.npy"), images)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONNOUSERSITE": "1"}
        try:
            done = subprocess.run([python or sys.executable, "-c", SERVE, tmp,
                                   *(os.path.join(version_dir, name) for name in formats)],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CanaryError(f"canary: loading the model in a fresh process took over {TIMEOUT_S} s") from None
        except OSError as exc:
            raise CanaryError(f"canary: cannot start {python or sys.executable} ({exc.strerror})") from None
        if done.returncode:
            lines = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
            raise CanaryError(f"canary: a fresh process could not load and run the model: {lines[-1][:300]}")
        outputs = {name: np.load(os.path.join(tmp, f"{name}.npy")) for name in formats}
    worst = 0.0
    for name, probs in outputs.items():
        if probs.shape != expected.shape:
            raise CanaryError(f"canary: {name} answered shape {probs.shape} for {expected.shape}")
        changed = int(np.sum(probs.argmax(axis=1) != expected.argmax(axis=1)))
        difference = float(np.max(np.abs(probs - expected)))
        if changed or difference > PROBABILITY_TOLERANCE:
            raise CanaryError(f"canary: {name} loaded in a fresh process predicts {changed} of {len(expected)} "
                              f"images differently (largest probability difference {difference:.2g}; "
                              f"tolerance {PROBABILITY_TOLERANCE:g})")
        worst = max(worst, difference)
    return {"seconds": round(time.time() - started, 2), "images": int(len(expected)), "formats": formats,
            "max_difference": worst}


# The fresh process, run with `python -c` from an empty folder: no file of this project is on its path.
SERVE = """
import os, sys
import numpy as np
import keras  # the server's imports, and only these

folder, models = sys.argv[1], sys.argv[2:]
pixels = (np.load(os.path.join(folder, "images.npy")).reshape(-1, 784) / 255.0).astype("float32")
for path in models:
    if path.endswith(".keras"):
        probs = keras.saving.load_model(path).predict(pixels, batch_size=len(pixels), verbose=0)
    else:
        import tensorflow as tf
        served = tf.saved_model.load(path)  # held: its functions need its variables alive
        probs = served.serve(pixels).numpy()
    np.save(os.path.join(folder, os.path.basename(path) + ".npy"), np.asarray(probs, dtype="float32"))
"""
