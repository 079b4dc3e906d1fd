"""The training stage: the mnist-train command, the driver, Ray Train's backend, the per-worker loop and its distributed step, checkpoints, failures, elastic runs."""
