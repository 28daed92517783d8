#!/usr/bin/env bash
# Builds diffloom (release) after the set-up, then runs it with the given arguments.
# Usage: scripts/run.sh run graphs/image_ops.ron [--set name=value ...]
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
"$here/setup.sh"
source "$here/env.sh"
(cd "$DIFFLOOM_ROOT" && cargo build --release --locked --quiet)
# The tiny random-weight models the example graphs use by default (real checkpoints: --set ckpt=PATH).
"$DIFFLOOM_ROOT/target/release/make-test-models" "$DIFFLOOM_ROOT/models/test" >/dev/null
exec "$DIFFLOOM_ROOT/target/release/diffloom" "$@"
