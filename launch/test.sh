#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on 4 fake CPU devices.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PYTHON" -m pytest -q --durations=15 tests "$@"
