"""The two models, built and compiled from the config. Pure Keras; nothing here knows about Ray.

mlp is the classic tutorial: 784 -> Dense(512, relu) -> Dense(10, softmax), RMSprop,
categorical cross-entropy, accuracy. cnn follows keras.io's mnist_convnet (about 99%).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from trainer.config import Config
from trainer.model import lr_schedule

NUM_CLASSES = 10
ROTATION_DEGREES = 10  # --augment: up to +-10 degrees,
SHIFT = 0.1  # +-10% (about 3 px) each way,
ZOOM = 0.1  # and +-10% zoom


def build_model(cfg: Config, steps_per_epoch: int | None = None) -> keras.Model:
    """A compiled model for `cfg.model`; call it inside strategy.scope() for distributed training.

    `steps_per_epoch` times the learning-rate warm-up (trainer/model/lr_schedule.py), if there is one.
    """
    keras.utils.set_random_seed(cfg.seed)  # every worker starts from the same weights
    if cfg.model == "mlp":
        model = keras.Sequential([
            keras.Input(shape=(784,), name="pixels"),
            *([layers.Reshape((28, 28, 1)), *augmentation(), layers.Flatten()] if cfg.augment else []),
            layers.Dense(cfg.hidden_units, activation="relu"),
            *([layers.Dropout(cfg.dropout)] if cfg.dropout else []),  # none by default: the tutorial's layers
            layers.Dense(NUM_CLASSES, activation="softmax"),
        ], name="mnist_mlp")
    elif cfg.model == "cnn":
        model = keras.Sequential([
            keras.Input(shape=(784,), name="pixels"),
            layers.Reshape((28, 28, 1)),
            *(augmentation() if cfg.augment else []),
            layers.Conv2D(32, kernel_size=3, activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Conv2D(64, kernel_size=3, activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(NUM_CLASSES, activation="softmax"),
        ], name="mnist_cnn")
    else:
        raise ValueError(f"unknown model {cfg.model!r}")
    return compile_model(model, lr_schedule.learning_rate(cfg, steps_per_epoch))


def compile_model(model: keras.Model, learning_rate) -> keras.Model:
    """The tutorial's compile: RMSprop at `learning_rate` (a float or a schedule), categorical
    cross-entropy, accuracy. Also what trainer/train/transfer.py recompiles a loaded model with."""
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return model


def augmentation() -> list[layers.Layer]:
    """Small random rotation, shift and zoom of (28, 28, 1) images; no flips (a flipped 2 is no digit).

    Active only with training=True (the worker's step); predict/evaluate pass training=False.
    The border fills with black, MNIST's background, instead of reflecting the digit's strokes.
    """
    return [
        layers.RandomRotation(ROTATION_DEGREES / 360, fill_mode="constant", name="augment_rotation"),
        layers.RandomTranslation(SHIFT, SHIFT, fill_mode="constant", name="augment_translation"),
        layers.RandomZoom(ZOOM, fill_mode="constant", name="augment_zoom"),
    ]


def preprocess(images, labels):
    """uint8 (n,28,28) images and 0..9 labels -> float32 (n,784) in [0,1] and one-hot (n,10).

    Keras ops, so the same code serves numpy arrays (evaluation, plain Keras; numpy comes back) and
    the tensors inside the workers' training step."""
    x = keras.ops.reshape(keras.ops.cast(images, "float32") / 255.0, (-1, 784))
    y = keras.ops.one_hot(keras.ops.cast(labels, "int32"), NUM_CLASSES)
    if isinstance(images, np.ndarray):
        return keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y)
    return x, y


def evaluate(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(test loss, test accuracy, softmax outputs (n, 10)) on uint8 images and 0..9 labels."""
    x, y = preprocess(images, labels)
    loss, accuracy = model.evaluate(x, y, batch_size=1000, verbose=0)
    return float(loss), float(accuracy), model.predict(x, batch_size=1000, verbose=0)
