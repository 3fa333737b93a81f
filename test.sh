#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 first, then leanseek[dev]) and runs the test suite. Extra arguments go to pytest.
# The web chat's browser test needs Debian's chromium: installed here when missing (as root, with apt); without
# it that one test is skipped.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "could not install chromium; the browser test will be skipped"
fi
exec .venv/bin/python -m pytest "$@"
