#!/usr/bin/env bash
# Scaling where workers do not share cores, and the GPU: two benchmark.py invocations, each with its
# own plain-Keras baseline measured in the same invocation. Meant for a machine with 16 cores and a
# GPU (under 8 minutes there); on 2 cores the worker counts fight over the cores and measure that.
#   bash scripts/gpu_benchmark.sh --data ../shared/data/mnist      # writes bench-gpu/{cpu,gpu}/
#   bash scripts/gpu_benchmark.sh --smoke                          # the committed sample, 1 epoch, 1 CPU
#                                                                  # per worker, 1 and 2 workers (a test)
# 1. CPU scaling: plain Keras with 4 threads (run a) against the job with 1, 2 and 4 workers x 4 CPUs
#    (runs w1, w2, w4): per-epoch ratios and scaling efficiency.
# 2. GPU: plain Keras on the GPU against the job with --use-gpu and 1 worker (run g1): the per-epoch
#    ratio (target <= 1.1x) and test accuracy. Skipped, and said so, where TensorFlow sees no GPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" ""
cd "$ROOT"
DATA=() OUT=bench-gpu CPUS=4 SMOKE=() SCALING_RUNS=a,w1,w2,w4
while [ $# -gt 0 ]; do
  case "$1" in
    --data) [ $# -ge 2 ] || { echo "error: --data needs a value" >&2; exit 2; }; DATA=(--data "$2"); shift 2 ;;
    --output) [ $# -ge 2 ] || { echo "error: --output needs a value" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --smoke) SMOKE=(--smoke); CPUS=1; SCALING_RUNS=a,w1,w2; shift ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
LOCAL_CPUS=$(( 4 * CPUS ))  # 4 workers x CPUS: every count fits
echo "== CPU scaling: plain Keras ($CPUS threads) vs the job at $CPUS CPUs a worker (runs $SCALING_RUNS)"
python scripts/benchmark.py "${SMOKE[@]}" "${DATA[@]}" --runs "$SCALING_RUNS" --output "$OUT/cpu" \
  --plain-args "--threads $CPUS" --job-args "--cpus-per-worker $CPUS --local-cpus $LOCAL_CPUS"
echo "== GPU: plain Keras on the GPU vs the job with --use-gpu, 1 worker"
if python -c "from trainer import quiet; import sys; sys.exit(not quiet.import_tensorflow().config.list_physical_devices('GPU'))"; then
  python scripts/benchmark.py "${SMOKE[@]}" "${DATA[@]}" --runs a,g1 --output "$OUT/gpu" --plain-args "--device gpu"
else
  echo "no GPU visible to TensorFlow here: GPU comparison skipped"
fi
