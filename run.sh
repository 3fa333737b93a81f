#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 first, then leanseek) and runs the main job. Until the whole pipeline lands, that is:
# the presets' parameter / FLOP / KV-cache table; the built-in corpus tokenized into training shards; a few minutes
# of pretraining the `tiny` model on it (STEPS, default 300; run again to resume or, with a larger STEPS, continue);
# and a check that transformers computes the same logits from the resulting checkpoint.
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
if [ -f "$runs/data-builtin/manifest.json" ]; then
  echo "reusing $runs/data-builtin (delete it to tokenize again)"
else
  .venv/bin/leanseek data --source builtin --out "$runs/data-builtin"
fi
echo
.venv/bin/leanseek pretrain --data "$runs/data-builtin" --out "$runs/pretrain-tiny" --preset tiny \
    --steps "${STEPS:-300}" --batch-size 16 --seq-len 256 --save-every 100 --eval-every 100
echo
.venv/bin/leanseek check "$runs/pretrain-tiny/latest"
echo "cost of the run: $runs/pretrain-tiny/cost.json; metrics: $runs/pretrain-tiny/metrics.jsonl"
