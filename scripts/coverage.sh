#!/usr/bin/env bash
# Regenerates README.md's "ComfyUI node coverage" section from the node registry: the output of
# `diffloom nodes --coverage` goes between the <!-- coverage:start --> and <!-- coverage:end --> lines.
# Run it after adding a node (tests/coverage.rs fails until the README matches). Usage: scripts/coverage.sh
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/env.sh"
cd "$DIFFLOOM_ROOT"
start='<!-- coverage:start -->'
end='<!-- coverage:end -->'
[[ $(grep -cxF "$start" README.md) == 1 && $(grep -cxF "$end" README.md) == 1 ]] ||
    { echo "coverage: README.md needs exactly one '$start' and one '$end' line" >&2; exit 1; }
cargo build --quiet --bin diffloom
table=$(mktemp)
new=$(mktemp)
trap 'rm -f "$table" "$new"' EXIT
target/debug/diffloom nodes --coverage >"$table"
awk -v start="$start" -v end="$end" -v table="$table" '
    $0 == start { print; while ((getline line < table) > 0) print line; skip = 1; next }
    $0 == end { skip = 0 }
    !skip' README.md >"$new"
cat "$new" >README.md
