#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 first, then leanseek[dev]) and runs the test suite. Extra arguments go to pytest.
# The web chat's browser test needs Debian's chromium, and the built-in define tool's tests Debian's WordNet
# (wordnet-base): installed here when missing (as root, with apt); without them those tests are skipped.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
missing=$( [ -x /usr/bin/chromium ] || echo chromium; dpkg -s wordnet-base >/dev/null 2>&1 || echo wordnet-base )
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; } \
    >/dev/null 2>&1 || echo "could not install $missing; the tests that need them will be skipped"
fi
exec .venv/bin/python -m pytest "$@"
