"""The serving export: a TensorFlow SavedModel of the trained model's inference pass.

    import tensorflow as tf
    served = tf.saved_model.load("models/mnist_savedmodel")
    probs = served.serve(pixels)  # float32 (n, 784) in [0, 1] -> (n, 10) class probabilities

The same function is the `serving_default` signature, for TensorFlow Serving
(input `pixels`, output `output_0`).
"""

from __future__ import annotations

import os
import shutil

from trainer.common.atomic import temporary_sibling

ENDPOINT = "serve"
DIRECTORY = "mnist_savedmodel"  # under --output


def export_savedmodel(model, path: str) -> str:
    """Write `model`'s inference pass to the SavedModel directory `path`, replacing any old one.

    The export goes to a temporary sibling that is renamed into place, so `path` is never a
    half-written export; an old export is moved aside, and deleted only once the new one is in place.
    """
    import keras
    import tensorflow as tf

    path = os.path.abspath(path)
    tmp, old = temporary_sibling(path), temporary_sibling(path, kind="old")
    archive = keras.export.ExportArchive()
    archive.track(model)
    # training=False, explicitly: model.export calls the model without it, which would leave
    # --augment's random layers (whose own default is training=True) on in the served model.
    archive.add_endpoint(ENDPOINT, lambda pixels: model(pixels, training=False),
                         input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.float32,
                                                        name="pixels")])
    try:
        archive.write_out(tmp, verbose=False)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(path):
            os.rename(old, path)  # the previous export stays in place
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path
