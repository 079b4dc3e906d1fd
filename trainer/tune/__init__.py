"""The search stage: mnist-tune, Ray Tune over the job's own trials, scored on a validation split (trainer/data/validation.py)."""
