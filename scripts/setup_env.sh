#!/usr/bin/env bash
# Create (or bring up to date) the project's virtual environment in .venv. Idempotent: a second run
# with unchanged pyproject.toml and constraints.txt does nothing. Offline-safe pins: torch 2.13.0 (CPU
# wheel), transformers 5.23.0, Jupyter Book 1; see constraints.txt for every exact version.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CGM_VENV:-.venv}"
PY="${PYTHON:-python3}"

"$PY" - <<'PYCHECK'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"Python >= 3.10 is needed, found {sys.version.split()[0]} (set PYTHON=/path/to/python3.11)")
PYCHECK

want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
stamp="$VENV/.cgm-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "environment $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "installing into $VENV (about 2 minutes on a fresh machine) ..."
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[all]"
# lmms-eval without its declared dependencies (they pull torchvision + a CUDA torch); what our evaluation
# path needs of them is in the `eval` extra above.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps lmms-eval==0.7.3
echo "$want" > "$stamp"
echo "environment $VENV ready"
