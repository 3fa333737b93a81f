#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 first, then leanseek) and runs the main job: the speedrun (built-in corpus, tokenizer,
# pretraining, SFT, GRPO, evaluation, report card) into $RUNS_DIR/speedrun-$PRESET (default runs/speedrun-cpu,
# under 20 minutes on 2 cores), then serves the assistant on http://127.0.0.1:$PORT (default 8000) with its web
# chat at /. Run it again to continue an interrupted speedrun (finished stages are skipped) and to serve again.
# PRESET=micro is a one-minute smoke run; SERVE=0 stops after the report.
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

out="$runs/speedrun-${PRESET:-cpu}"
.venv/bin/leanseek speedrun --preset "${PRESET:-cpu}" --out "$out"
if [ "${SERVE:-1}" = 0 ]; then
  exit 0
fi
echo
echo "starting the assistant (Ctrl-C stops it); the web chat will be at http://127.0.0.1:${PORT:-8000}"
exec .venv/bin/leanseek serve "$out/rl" --port "${PORT:-8000}" --name leanseek
