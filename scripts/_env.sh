# Sourced by scripts/train.sh and scripts/test.sh: make .venv with this project installed.
# Needs only python3.11 (or $PYTHON). Re-installs only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "error: this project needs Python 3.11 (found $("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo nothing that runs) as $PYTHON);" \
         "install it (apt install python3.11 python3.11-venv, or pyenv install 3.11) or set PYTHON=/path/to/python3.11" >&2
    exit 2
  fi
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)${EXTRAS:+-$EXTRAS}"
INSTALLED=""
if [ ! -f "$STAMP" ]; then
  echo "installing the project into $VENV (first run: a few minutes, docs/performance.md; pip's output in $VENV/install.log)" >&2
  if ! { "$VENV/bin/python" -m pip install --quiet --upgrade pip &&
         "$VENV/bin/python" -m pip install --quiet -e "$ROOT${EXTRAS:+[$EXTRAS]}"; } > "$VENV/install.log" 2>&1; then
    tail -n 20 "$VENV/install.log" >&2
    echo "error: pip could not install the project (the whole log: $VENV/install.log)" >&2
    exit 1
  fi
  touch "$STAMP"
  INSTALLED=1  # scripts/train.sh then starts the job as a process of its own, which times itself from its start
fi
export PATH="$VENV/bin:$PATH"
