#!/usr/bin/env bash
# Set up (if needed) and run the tests on 4 fake CPU devices, in parallel pytest-xdist
# workers (one per core, at most 4). Arguments go to pytest (paths, -k, -x, ...).
#   bash launch/test.sh            the quick suite: every test not marked slow
#   bash launch/test.sh --all      every test (what .ci/run runs, in two parts)
#   bash launch/test.sh --slow     only the tests marked slow
# With a test path or node id among the arguments, every selected test runs, slow or not.
# docs/testing.md: the two tiers, the tolerance policy and the second CPU code path.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tier=(-m "not slow")
args=()
for a in "$@"; do
  case "$a" in
    --all) tier=() ;;
    --slow) tier=(-m slow) ;;
    -*) args+=("$a") ;;
    *tests/*|*.py|*::*) tier=(); args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
"$PYTHON" -m pytest -q --durations=15 --numprocesses=auto --maxprocesses=4 --dist=loadfile \
  ${tier[@]+"${tier[@]}"} ${args[@]+"${args[@]}"}
