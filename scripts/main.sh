#!/usr/bin/env bash
# The main job: set up the environment, execute every notebook with papermill at the default CPU preset,
# and build the book (HTML, whole-book PDF, slide figures). Idempotent (outputs are replaced, never half-written); leaves no process behind.
#   bash scripts/main.sh            # preset cpu
#   PRESET=tiny bash scripts/main.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/ensure_chromium.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m cgm_min.pipeline all --preset "${PRESET:-cpu}" --out build
