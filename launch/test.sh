#!/usr/bin/env bash
# Set up (if needed) and run the test suite on 4 fake CPU devices, in parallel pytest-xdist
# workers (one per core, at most 4). Arguments go to pytest (paths, -k, -x, ...); without
# paths it runs tests/. docs/testing.md: the tolerance policy and the second CPU code path.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PYTHON" -m pytest -q --durations=15 --numprocesses=auto --maxprocesses=4 --dist=loadfile "$@"
