"""The learning rate for a global batch other than the tutorial's 128. Pure Keras; no Ray.

    --lr-scaling linear   rate = learning_rate x batch / 128 (Goyal et al. 2017, "ImageNet in 1 hour")
    --lr-scaling sqrt     rate = learning_rate x sqrt(batch / 128)
    --warmup-epochs N     ramp linearly, every step, from learning_rate to that rate over N epochs

The ramp is Keras's own CosineDecay with alpha=1 (flat after warm-up), so a saved .keras model
loads with plain `keras.saving.load_model`, without this project's code. The schedule is driven
by the optimizer's `iterations`, which checkpoints restore, so a resumed run continues the ramp.
"""

from __future__ import annotations

import math

import keras

from trainer.config import BASE_BATCH_SIZE, Config


def scaled_rate(cfg: Config) -> float:
    """The learning rate after warm-up: the tutorial's rate scaled for the global batch."""
    ratio = cfg.batch_size / BASE_BATCH_SIZE
    return cfg.learning_rate * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def learning_rate(cfg: Config, steps_per_epoch: int | None = None):
    """RMSprop's `learning_rate`: a float, or a warm-up schedule when `cfg.warmup_epochs` > 0.

    `steps_per_epoch` sets the ramp's length; without it (a model rebuilt only to evaluate and save
    a finished run) the ramp has length 0: the rate after warm-up, which is where training ended.
    """
    if not cfg.warmup_epochs:
        return scaled_rate(cfg)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate, decay_steps=1, alpha=1.0,  # alpha=1: no decay
        warmup_target=scaled_rate(cfg), warmup_steps=cfg.warmup_epochs * (steps_per_epoch or 0),
        name="linear_warmup")

