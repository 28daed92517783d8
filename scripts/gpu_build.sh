#!/usr/bin/env bash
# Builds diffloom for a GPU machine whose PyTorch differs from the project's (the lent machines run
# their own CUDA build, e.g. torch 2.11.0+cu130, without a Rust toolchain or network): downloads that
# torch wheel here, builds the release binaries against its libtorch with the tch release made for it,
# and puts them in .gpu/bin, the folder `scripts/gpu_check.sh` runs from (carry .gpu/bin there).
# Usage: scripts/gpu_build.sh [TORCH_VERSION]   (default 2.11.0; the tch release for it is chosen below)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
"$here/setup.sh"
version=${1:-2.11.0}
# tch's releases each bind one libtorch (torch-sys's TORCH_VERSION).
case $version in
    2.11.*) tch=0.24.0 ;;
    2.12.*) tch=0.25.0 ;;
    2.13.*) tch=0.26.0 ;;
    *) echo "gpu_build: no tch release known for torch $version" >&2; exit 2 ;;
esac
gpu=$root/.gpu
mkdir -p "$gpu/wheels" "$gpu/bin"
lib=$gpu/libtorch-$version
if [[ ! -f $lib/torch/lib/libtorch_cpu.so ]]; then
    echo "gpu_build: downloading torch==$version (its libtorch and headers)"
    "$root/.venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$gpu/wheels" "torch==$version"
    mkdir -p "$lib"
    (cd "$lib" && unzip -q -o "$gpu"/wheels/torch-"$version"-*.whl 'torch/lib/*' 'torch/include/*')
    rm -f "$gpu"/wheels/torch-"$version"-*.whl
fi
# A copy of the tracked sources with the tch release for that libtorch (the project's own build and
# Cargo.lock stay as they are).
src=$gpu/src
rm -rf "$src" && mkdir -p "$src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src")
sed -i "s/^tch = \"0\.26\"/tch = \"=$tch\"/" "$src/Cargo.toml"
cd "$src"
cargo update --quiet -p tch --precise "$tch" 2>/dev/null || cargo update --quiet -p tch
export LIBTORCH=$lib/torch LIBTORCH_CXX11_ABI=1 CARGO_TARGET_DIR=$gpu/target
# No rpath to this machine's copy: on the GPU machine LD_LIBRARY_PATH points at its own torch.
cargo build --release --quiet --bin diffloom --bin make-test-models
# The CUDA tests (tests/gpu.rs) and the GPU benchmark, as plain executables.
exe() { # TARGET-NAME CARGO-ARGS...: the executable cargo built for that target
    local name=$1
    shift
    cargo "$@" --no-run --message-format=json 2>/dev/null | grep -F "\"name\":\"$name\",\"src_path\"" \
        | grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//' | tail -n 1
}
cp "$(exe gpu test --release --test gpu)" "$gpu/bin/gpu-tests"
cp "$(exe gpu_bench bench --bench gpu_bench)" "$gpu/bin/gpu-bench"
cp "$gpu/target/release/diffloom" "$gpu/target/release/make-test-models" "$gpu/bin/"
strip "$gpu/bin/"{diffloom,make-test-models,gpu-tests,gpu-bench}
# What the checks read besides the binaries: the CLIP vocabulary the set-up made, and diffusers (its
# dependencies are on such machines) as a wheel for the reference benchmark.
cp -r "$root/models/clip-tokenizer" "$gpu/bin/"
mkdir -p "$gpu/whl"
"$root/.venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$gpu/whl" \
    "$(grep -i '^diffusers==' "$root/requirements.txt")"
echo "$version" > "$gpu/bin/TORCH_VERSION"
du -sh "$gpu/bin" "$gpu/whl"
