#!/usr/bin/env bash
# Start a one-machine Ray cluster (a head node) on 127.0.0.1 with token authentication, for
# `ray job submit`. Stop it with scripts/stop_cluster.sh and the same --port (or --temp-dir).
#   bash scripts/start_cluster.sh                       # GCS on 6379, dashboard/jobs on 8265
#   bash scripts/start_cluster.sh --num-cpus 8 -- --num-gpus 0   # after --: more `ray start` flags
# Flags (or env): --port (MNIST_RAY_PORT, 6379), --dashboard-port (MNIST_RAY_DASHBOARD_PORT, 8265),
# --num-cpus (MNIST_RAY_NUM_CPUS, the cores),
# --temp-dir (MNIST_RAY_TEMP_DIR, /tmp/mnist-ray-<port>: this cluster's sessions, logs and state),
# --timeout (MNIST_RAY_START_TIMEOUT, 120 s to wait for the job server).
# The token is $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (created
# owner-only if missing; one that others can read is refused). Clients need RAY_AUTH_MODE=token;
# the script prints what to export.
# What it started is recorded in <temp-dir>/cluster.env; stop_cluster.sh stops exactly that.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${MNIST_RAY_PORT:-6379}"
DASHBOARD_PORT="${MNIST_RAY_DASHBOARD_PORT:-8265}"
NUM_CPUS="${MNIST_RAY_NUM_CPUS:-$(nproc)}"
TEMP_DIR="${MNIST_RAY_TEMP_DIR:-}"
TIMEOUT="${MNIST_RAY_START_TIMEOUT:-120}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in --*) [ "$1" = -- ] || [ "$1" = --help ] || [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; } ;; esac
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --temp-dir) TEMP_DIR="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown flag $1 (see --help; pass ray start flags after --)" >&2; exit 2 ;;
  esac
done
for value in "$PORT" "$DASHBOARD_PORT" "$NUM_CPUS" "$TIMEOUT"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "error: expected a whole number, got '$value'" >&2; exit 2; }
done
if [ -z "${RAY:-}" ]; then  # tests pass the venv's ray in $RAY; people get .venv set up
  source "$ROOT/scripts/_env.sh" ""
  RAY=ray
fi
# The cluster's processes (and a submitted job's `python`) use the Python that has this ray.
PATH="$(dirname "$(command -v "$RAY")"):$PATH"
TEMP_DIR="$(realpath -m "${TEMP_DIR:-/tmp/mnist-ray-$PORT}")"  # short: Ray's unix sockets live under it (108-byte limit)
STATE="$TEMP_DIR/cluster.env"
if [ -f "$STATE" ]; then
  PID="$(sed -n 's/^MNIST_RAY_PID=//p' "$STATE")"
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    echo "error: a cluster started by this script is already running (pid $PID, $STATE); stop it with: bash scripts/stop_cluster.sh --temp-dir $TEMP_DIR" >&2
    exit 1
  fi
fi
mkdir -p "$TEMP_DIR"

# Token authentication: an explicit mode, so a client that lacks the token fails loudly.
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [ ! -s "$TOKEN_FILE" ]; then
    mkdir -p "$(dirname "$TOKEN_FILE")"
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE")  # 256 bits, as Ray's own
    echo "created token $TOKEN_FILE"
  elif [ -n "$(find "$TOKEN_FILE" -maxdepth 0 -perm /077)" ]; then
    # The token is the cluster's only lock. One others could read may already be in their hands
    # (Ray itself writes ~/.ray/auth_token with the umask: 0644 on most machines); tightening it
    # now would not take it back.
    echo "error: $TOKEN_FILE can be read by others (mode $(stat -c %a "$TOKEN_FILE")), so anyone on this machine may hold the cluster's token: remove it (a new one is made), or chmod 600 it if you are sure nobody read it, and start again" >&2
    exit 2
  fi
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Ray's two fixed default ports (10001 client server, 52365 agent) clash with any other Ray here.
case " ${EXTRA[*]:-} " in *" --ray-client-server-port"*) ;; *) EXTRA+=(--ray-client-server-port "$(free_port)") ;; esac
case " ${EXTRA[*]:-} " in *" --dashboard-agent-listen-port"*) ;; *) EXTRA+=(--dashboard-agent-listen-port "$(free_port)") ;; esac

# --block keeps one `ray start` process as the owner of every process of this node; SIGTERM to it
# stops them all (and only them). setsid detaches it from this shell and its Ctrl-C. Every process
# of the cluster inherits MNIST_RAY_CLUSTER, so stop_cluster.sh can find stragglers precisely.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 marks a one-machine cluster: without it Ray swaps 127.0.0.1
# for the host's address and its GCS, raylet and client server listen beyond loopback.
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: a stop tears down at once, not after a 30 s drain wait
# (the drain exists for Serve replicas; a stopped job here is gone either way).
LOG="$TEMP_DIR/start.log"
MNIST_RAY_CLUSTER="$TEMP_DIR" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
  setsid "$RAY" start --head --block --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
  --port "$PORT" --dashboard-port "$DASHBOARD_PORT" --num-cpus "$NUM_CPUS" \
  --temp-dir "$TEMP_DIR" --disable-usage-stats "${EXTRA[@]}" </dev/null >"$LOG" 2>&1 &
PID=$!
cat >"$STATE.tmp" <<EOF
MNIST_RAY_PID=$PID
MNIST_RAY_GCS_ADDRESS=127.0.0.1:$PORT
MNIST_RAY_DASHBOARD=http://127.0.0.1:$DASHBOARD_PORT
MNIST_RAY_TEMP_DIR=$TEMP_DIR
EOF
mv "$STATE.tmp" "$STATE"

# Ready when the job server answers an authenticated request (the head is up, its agent too).
DEADLINE=$(( SECONDS + TIMEOUT ))
until RAY_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT" "$RAY" job list >/dev/null 2>&1; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "error: ray start exited; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    rm -f "$STATE"
    exit 1
  fi
  if [ "$SECONDS" -ge "$DEADLINE" ]; then
    echo "error: the job server did not answer within ${TIMEOUT}s; stopping (log: $LOG)" >&2
    bash "$ROOT/scripts/stop_cluster.sh" --temp-dir "$TEMP_DIR" >&2 || true
    exit 1
  fi
  sleep 1
done
SESSION="$(readlink -f "$TEMP_DIR/session_latest" 2>/dev/null || echo "$TEMP_DIR")"
echo "MNIST_RAY_SESSION_DIR=$SESSION" >>"$STATE"
cat <<EOF
Ray head started on 127.0.0.1 (pid $PID, $NUM_CPUS CPUs, session $SESSION).
A client needs:
  export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
  export RAY_AUTH_MODE=token
Stop it with: bash scripts/stop_cluster.sh --temp-dir $TEMP_DIR
EOF
