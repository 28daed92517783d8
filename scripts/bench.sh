#!/usr/bin/env bash
# Runs a benchmark (release build) after the set-up. Benchmarks print figures; none is a timed test.
# Usage: scripts/bench.sh executor
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
"$here/setup.sh"
source "$here/env.sh"
cd "$DIFFLOOM_ROOT"
case "${1:-}" in
    executor) cargo bench --locked --bench executor ;;
    *) echo "usage: scripts/bench.sh executor" >&2; exit 2 ;;
esac
