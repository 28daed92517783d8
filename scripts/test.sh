#!/usr/bin/env bash
# The whole test suite, set-up included: the venv with libtorch (scripts/setup.sh), cargo fmt --check
# and clippy -D warnings, then every Rust test of the workspace. Usage: scripts/test.sh
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
"$here/setup.sh"
source "$here/env.sh"
cd "$DIFFLOOM_ROOT"
# The surface first: formatting and lints fail the run before any test (cheap, and clearer).
cargo fmt --version >/dev/null 2>&1 || { echo "test: rustfmt is missing (rustup component add rustfmt)" >&2; exit 1; }
cargo clippy --version >/dev/null 2>&1 || { echo "test: clippy is missing (rustup component add clippy)" >&2; exit 1; }
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
# The tiny random-weight models the example graphs use (tests make their own as well).
cargo build --locked --quiet --bin make-test-models
target/debug/make-test-models models/test
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# cargo prints one summary per test binary (the last ones are empty doc-test runs); one total line:
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
