#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 first, then leanseek) and runs the main job. Until the training pipeline lands, that
# is: the presets' parameter / FLOP / KV-cache table; the built-in corpus tokenized into training shards; a freshly
# initialised `tiny` model written as a Hugging Face folder; and a check that leanseek and transformers compute the
# same logits from it.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
runs=${RUNS_DIR:-runs}

# The built-in corpus grows with these Debian packages (dictionary, WordNet, Python docs, ...): install them when
# we can (root on Debian/Ubuntu), go on without them when we cannot.
packages=$(.venv/bin/python -c "from leanseek.data.builtin import DEBIAN_PACKAGES; print(*DEBIAN_PACKAGES)")
missing=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done 2>/dev/null || true)
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing the built-in corpus' Debian packages: $missing"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; } \
    >/dev/null 2>&1 || echo "could not install them; the built-in corpus will be smaller"
fi

.venv/bin/leanseek presets
echo
.venv/bin/leanseek data --source builtin --out "$runs/data-builtin"
echo
.venv/bin/leanseek info tiny
echo
.venv/bin/leanseek init --preset tiny --out "$runs/tiny-init"
.venv/bin/leanseek check "$runs/tiny-init"
