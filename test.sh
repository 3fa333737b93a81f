#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 first, then leanseek[dev]) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
exec .venv/bin/python -m pytest "$@"
