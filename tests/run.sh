#!/usr/bin/env bash
# The test command (README and .ci/run both call exactly this).
# Creates .venv in the pack folder on first use, then runs the whole suite.
# The ComfyUI integration suite runs when COMFYUI_PATH names a ComfyUI checkout
# (see README); without one it says so loudly and skips only that part.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest's 5 means "no tests collected": for us that is a failure, not a pass.
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
