#!/usr/bin/env bash
# The test suite: set up the environment (and headless Chromium for the book test), then run pytest:
# unit tests of the math, the notebooks at preset `tiny` with papermill, the offline book build and the
# browser check of the built pages. Extra arguments go to pytest (e.g. `-m "not slow"` for the unit part).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/ensure_chromium.sh
if command -v chromium >/dev/null 2>&1; then export CGM_REQUIRE_BROWSER=1; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -ra "$@"
