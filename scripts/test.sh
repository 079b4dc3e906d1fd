#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite; pytest flags pass through.
# Full-MNIST tests (marked slow) run when MNIST_DATA points at MNIST, and skip otherwise.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -m "not slow"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" test
cd "$ROOT"
bash scripts/mlflow.sh --version > /dev/null  # the tracking server's own environment, for tests/test_tracking.py
exec python -m pytest "$@"
