#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 first, then leanseek) and runs the main job. Until the training pipeline lands, that is:
# the presets' parameter / FLOP / KV-cache table, a freshly initialised `tiny` model written as a Hugging Face
# folder, and a check that leanseek and transformers compute the same logits from it.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
out=${1:-runs/tiny-init}
.venv/bin/leanseek presets
echo
.venv/bin/leanseek info tiny
echo
.venv/bin/leanseek init --preset tiny --out "$out"
.venv/bin/leanseek check "$out"
