#!/usr/bin/env bash
# MLflow's own command line (server, ui, ...) from .venv-mlflow, made on first use. Its own
# environment: the full `mlflow` package (server and UI) pins pyarrow<26, and the job pins 26; the
# job itself needs only the client (pyproject.toml's `tracking` extra).
#   bash scripts/mlflow.sh ui --backend-store-uri sqlite:///models/mlflow.db        # http://127.0.0.1:5000
#   bash scripts/mlflow.sh server --host 127.0.0.1 --port 5000 \
#       --backend-store-uri sqlite:///srv/mlflow/mlflow.db --artifacts-destination /srv/mlflow/artifacts
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MLFLOW="mlflow==3.17.2"  # the same release as the tracking extra's mlflow-skinny (tests/test_tracking.py checks)
VENV="${MLFLOW_VENV:-$ROOT/.venv-mlflow}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
STAMP="$VENV/.installed-${MLFLOW}"
if [ ! -f "$STAMP" ]; then
  echo "installing $MLFLOW into $VENV (first run: about a minute of the first install, docs/performance.md; pip's output in $VENV/install.log)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip install --quiet "$MLFLOW" > "$VENV/install.log" 2>&1; then
    tail -n 20 "$VENV/install.log" >&2
    echo "error: pip could not install $MLFLOW (the whole log: $VENV/install.log)" >&2
    exit 1
  fi
  touch "$STAMP"
fi
exec "$VENV/bin/mlflow" "$@"
