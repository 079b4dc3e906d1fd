#!/usr/bin/env bash
# Set up .venv (first run: a few minutes, docs/performance.md) and run the training job; flags pass through.
#   bash scripts/train.sh --data ../shared/data/mnist --num-workers 2
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" ""
cd "$ROOT"
if [ -n "$INSTALLED" ]; then  # exec would keep this process, whose start the job's timeline would count from
  python jobs/train_mnist.py "$@"
  exit $?
fi
exec python jobs/train_mnist.py "$@"
