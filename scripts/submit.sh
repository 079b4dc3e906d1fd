#!/usr/bin/env bash
# Submit the training job to a running Ray cluster and follow its logs; flags go to jobs/train_mnist.py.
#   bash scripts/start_cluster.sh
#   bash scripts/submit.sh --data tests/data/mnist_sample.npz --num-workers 2 --storage-path /tmp/mnist-runs
# RAY_ADDRESS defaults to http://127.0.0.1:8265 (for `ray up cluster.yaml`, run `ray dashboard cluster.yaml`
# first). Paths are as the cluster sees them: relative ones resolve in the uploaded working dir, so give
# --storage-path as an absolute path or a URI. Exits 1 if the job FAILED; Ctrl-C stops following, not the job.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" ""
cd "$ROOT"
export RAY_AUTH_MODE=token
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
  --runtime-env jobs/runtime_env.yaml -- python jobs/train_mnist.py "$@"
