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
    models)
        # A full-size SD 1.5 random-weight checkpoint (about 2 GB, made once).
        cargo build --release --locked --quiet --bin make-test-models
        target/release/make-test-models models/bench --full-sd1
        cargo bench --locked --bench models ;;
    sampling)
        cargo build --release --locked --quiet --bin make-test-models
        target/release/make-test-models models/bench --full-sd1
        cargo bench --locked --bench sampling ;;
    coldstart)
        cargo build --release --locked --quiet --bin make-test-models
        target/release/make-test-models models/bench --full-sd1
        cargo bench --locked --bench coldstart ;;
    controlnet)
        cargo build --release --locked --quiet --bin make-test-models
        target/release/make-test-models models/bench --full-sd1
        cargo bench --locked --bench controlnet ;;
    watch) cargo bench --locked --bench watch ;;
    lua) cargo bench --locked --bench lua ;;
    upscale) cargo bench --locked --bench upscale ;;
    serve) cargo bench --locked --bench serve ;;
    profile)
        # Where the UNet's time goes (torch.profiler over diffusers' UNet on the same checkpoint).
        cargo build --release --locked --quiet --bin make-test-models
        target/release/make-test-models models/bench --full-sd1
        .venv/bin/python tests/bench/unet_profile.py models/bench/full-sd1.safetensors ;;
    *) echo "usage: scripts/bench.sh executor|models|coldstart|sampling|controlnet|watch|lua|upscale|serve|profile" >&2; exit 2 ;;
esac
