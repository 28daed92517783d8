#!/usr/bin/env bash
# The whole test suite, set-up included: the venv with libtorch (scripts/setup.sh), then every Rust
# test of the workspace. Usage: scripts/test.sh
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
"$here/setup.sh"
source "$here/env.sh"
cd "$DIFFLOOM_ROOT"
# The tiny random-weight models the example graphs use (tests make their own as well).
cargo build --locked --quiet --bin make-test-models
target/debug/make-test-models models/test
cargo test --workspace --locked
