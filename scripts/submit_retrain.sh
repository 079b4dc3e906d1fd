#!/usr/bin/env bash
# Submit one scheduled retraining run to a Ray cluster (run by cron, the systemd timer, or a person):
#   RAY_ADDRESS=http://127.0.0.1:8265 MNIST_STORE=/srv/mnist-store MNIST_DATA=/srv/mnist \
#     bash scripts/submit_retrain.sh [more jobs/retrain.py flags]
# The submission id is the slot, the UTC hour: mnist-retrain-2026-11-28T02. Ray refuses a second
# submission with an id it has seen, so a slot fired twice (cron and systemd both, a retry) trains
# once; this script reports that refusal as "already done" and exits 0. Overlapping slots are
# stopped by the model store's lock (the later run exits 0). Logs: $MNIST_RETRAIN_LOG_DIR/submit.log.
#   RAY_ADDRESS            the cluster's dashboard address (required)
#   MNIST_STORE            the model store, as the head node sees it (required)
#   MNIST_DATA             the training data, as the head node sees it (default: the job's own default)
#   MNIST_RETRAIN_SLOT     override the slot (default: date -u +%Y-%m-%dT%H)
#   MNIST_RETRAIN_LOG_DIR  default: $XDG_STATE_HOME/mnist-retrain or ~/.local/state/mnist-retrain
#   MNIST_RUNTIME_ENV      default: jobs/runtime_env.yaml
# Token auth: RAY_AUTH_MODE=token is exported; the token comes from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray reads it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray cluster dashboard, e.g. http://127.0.0.1:8265}"
: "${MNIST_STORE:?set MNIST_STORE to the model store directory, as the head node sees it}"
export RAY_AUTH_MODE=token
RAY="${RAY:-ray}"  # tests put a stand-in here
SLOT="${MNIST_RETRAIN_SLOT:-$(date -u +%Y-%m-%dT%H)}"
SUBMISSION_ID="mnist-retrain-$SLOT"
RUNTIME_ENV="${MNIST_RUNTIME_ENV:-jobs/runtime_env.yaml}"
LOG_DIR="${MNIST_RETRAIN_LOG_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/mnist-retrain}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/submit.log"

log() { printf '%s %s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SUBMISSION_ID" "$*" | tee -a "$LOG"; }

if [ ! -f "$RUNTIME_ENV" ]; then
  log "error: runtime environment $RUNTIME_ENV not found (set MNIST_RUNTIME_ENV)"
  exit 2
fi
# A submitted working dir carries no .git, so the version record gets the commit from here.
COMMIT="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
ENTRYPOINT=(env "MNIST_GIT_COMMIT=$COMMIT" python jobs/retrain.py --store "$MNIST_STORE")
if [ -n "${MNIST_DATA:-}" ]; then
  ENTRYPOINT+=(--data "$MNIST_DATA")
fi
ENTRYPOINT+=("$@")

log "submitting to $RAY_ADDRESS: ${ENTRYPOINT[*]}"
set +e
OUTPUT="$("$RAY" job submit --address "$RAY_ADDRESS" --submission-id "$SUBMISSION_ID" \
  --runtime-env "$RUNTIME_ENV" --working-dir . --no-wait -- "${ENTRYPOINT[@]}" 2>&1)"
STATUS=$?
set -e
printf '%s\n' "$OUTPUT" >>"$LOG"
if [ "$STATUS" -eq 0 ]; then
  log "submitted; follow it with: ray job logs -f --address $RAY_ADDRESS $SUBMISSION_ID"
  exit 0
fi
if grep -q "submission_id $SUBMISSION_ID already exists" <<<"$OUTPUT"; then
  log "already done: Ray refused a second submission for slot $SLOT"
  exit 0
fi
log "error: ray job submit failed (exit $STATUS); its output is in $LOG"
printf '%s\n' "$OUTPUT" | tail -n 5 >&2
exit "$STATUS"
