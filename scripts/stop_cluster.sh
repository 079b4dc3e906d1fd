#!/usr/bin/env bash
# Stop the Ray cluster scripts/start_cluster.sh started, and nothing else (unlike `ray stop`,
# which stops every Ray on the machine).
#   bash scripts/stop_cluster.sh                    # the one on --port 6379
#   bash scripts/stop_cluster.sh --temp-dir DIR     # or --port N, as given to start_cluster.sh
# Sends SIGTERM to the recorded `ray start --block` process (it stops its raylet, GCS, dashboard
# and workers), waits up to --grace seconds (MNIST_RAY_STOP_GRACE, 30), then SIGKILLs it and any
# process left that inherited this cluster's MNIST_RAY_CLUSTER marker.
set -euo pipefail
PORT="${MNIST_RAY_PORT:-6379}"
TEMP_DIR="${MNIST_RAY_TEMP_DIR:-}"
GRACE="${MNIST_RAY_STOP_GRACE:-30}"
while [ $# -gt 0 ]; do
  case "$1" in --*) [ "$1" = -- ] || [ "$1" = --help ] || [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; } ;; esac
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --temp-dir) TEMP_DIR="$2"; shift 2 ;;
    --grace) GRACE="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$GRACE" =~ ^[0-9]+$ ]] || { echo "error: --grace expects whole seconds, got '$GRACE'" >&2; exit 2; }
TEMP_DIR="$(realpath -m "${TEMP_DIR:-/tmp/mnist-ray-$PORT}")"
STATE="$TEMP_DIR/cluster.env"
if [ ! -f "$STATE" ]; then
  echo "error: no cluster recorded at $STATE (nothing started by scripts/start_cluster.sh there)" >&2
  exit 1
fi
PID="$(sed -n 's/^MNIST_RAY_PID=//p' "$STATE")"
[[ "$PID" =~ ^[0-9]+$ ]] || { echo "error: $STATE has no valid MNIST_RAY_PID" >&2; exit 1; }

# Our processes: those that inherited MNIST_RAY_CLUSTER=<temp dir> from start_cluster.sh (the
# raylet, GCS, dashboard, workers, submitted jobs' drivers); a shell merely in the dir is not.
ours() {
  local p
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    if { tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null | grep -qxF "MNIST_RAY_CLUSTER=$TEMP_DIR"; then
      echo "$p"
    fi
  done
}
is_our_start() { { tr '\0' ' ' <"/proc/$PID/cmdline"; } 2>/dev/null | grep -qF -- "--temp-dir $TEMP_DIR"; }

if is_our_start; then
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq "$GRACE"); do
    is_our_start || break
    sleep 1
  done
  if is_our_start; then
    echo "ray start (pid $PID) still running after ${GRACE}s; killing it" >&2
    kill -KILL "$PID" 2>/dev/null || true
  fi
else
  echo "ray start (pid $PID) is not running; cleaning up what is left of $TEMP_DIR" >&2
fi
for _ in 1 2 3 4 5; do  # processes it told to stop may take a moment
  [ -z "$(ours)" ] && break
  sleep 1
done
LEFT="$(ours)"
if [ -n "$LEFT" ]; then
  echo "killing leftover processes of this cluster: $(echo $LEFT)" >&2
  kill -KILL $LEFT 2>/dev/null || true
fi
rm -f "$STATE"
echo "stopped the Ray cluster in $TEMP_DIR"
