#!/usr/bin/env bash
# Idempotent set-up: a project-local venv (.venv) holding the pinned requirements.txt, torch==2.13.0
# among them, whose libtorch tch builds against. Re-runs are a quick no-op until requirements.txt
# changes. Usage: scripts/setup.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DIFFLOOM_ROOT"

die() { echo "setup: $*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo was not found: install Rust (https://rustup.rs) and retry."
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || die "$PYTHON was not found: install Python 3.10-3.13 (with venv and pip) and retry."
"$PYTHON" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 13)))' \
    || die "$("$PYTHON" --version 2>&1) is not supported: torch 2.13.0 wheels need Python 3.10-3.13."
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON lacks the venv/ensurepip modules (on Debian/Ubuntu: apt-get install python3-venv)."

want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
stamp=$DIFFLOOM_VENV/.diffloom-requirements
if [[ ! -f $stamp || $(cat "$stamp") != "$want" || -z $LIBTORCH ]]; then
    echo "setup: installing requirements.txt into .venv (torch 2.13.0 is ~3 GB with its CUDA libraries; about a minute)"
    [[ -x $DIFFLOOM_VENV/bin/python ]] || "$PYTHON" -m venv "$DIFFLOOM_VENV"
    "$DIFFLOOM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r requirements.txt \
        || die "pip could not install requirements.txt (is the package registry reachable?)"
    "$DIFFLOOM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps -r requirements-nodeps.txt \
        || die "pip could not install requirements-nodeps.txt"
    echo "$want" > "$stamp"
    source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
    [[ -f $LIBTORCH/include/torch/csrc/api/include/torch/torch.h ]] || die "the torch wheel in .venv carries no libtorch headers at $LIBTORCH"
    echo "setup: venv ready (LIBTORCH=$LIBTORCH)"
fi

# A fixed path to libtorch (the venv's site-packages folder names the Python version), which
# .cargo/config.toml gives cargo, so a plain `cargo build` or `cargo test` works after this set-up.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[[ -d $DIFFLOOM_VENV/libtorch/lib ]] || ln -sfn "$(cd "$LIBTORCH" && pwd -P)" "$DIFFLOOM_VENV/libtorch"

# The CLIP BPE vocabulary: no model hub is reachable, but the open-clip-torch wheel on PyPI ships
# OpenAI's bpe_simple_vocab_16e6.txt.gz; scripts/clip_vocab.py turns it into vocab.json + merges.txt
# exactly as transformers' CLIPTokenizer reads them.
OPEN_CLIP=open-clip-torch==3.3.0
if [[ ! -f $DIFFLOOM_CLIP_VOCAB_DIR/merges.txt ]]; then
    echo "setup: extracting the CLIP vocabulary from $OPEN_CLIP"
    wheels=$DIFFLOOM_VENV/wheels
    "$DIFFLOOM_VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$wheels" "$OPEN_CLIP" || die "pip could not download $OPEN_CLIP"
    "$DIFFLOOM_VENV/bin/python" scripts/clip_vocab.py "$(ls "$wheels"/open_clip_torch-*.whl | head -n1)" "$DIFFLOOM_CLIP_VOCAB_DIR" >/dev/null
fi

# The browser test drives the ComfyUI frontend `diffloom serve` serves in Debian's Chromium through its
# chromedriver (packages chromium and chromium-driver).
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "setup: installing Debian's chromium and chromium-driver (for the browser test)"
    apt=(apt-get install -y -q --no-install-recommends chromium chromium-driver)
    if [[ $(id -u) -eq 0 ]]; then
        (DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; }) \
            || die "apt-get could not install chromium and chromium-driver"
    elif command -v sudo >/dev/null; then
        (sudo DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null || { sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; }) \
            || die "apt-get could not install chromium and chromium-driver"
    else
        die "the browser test needs Debian's chromium and chromium-driver: install them (apt-get install chromium chromium-driver) and retry"
    fi
fi

# The queue tests (tests/queue.rs) start Debian's redis-server (Redis 7) on a loopback port.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "setup: installing Debian's redis-server (for the queue tests)"
    apt=(apt-get install -y -q --no-install-recommends redis-server)
    if [[ $(id -u) -eq 0 ]]; then
        (DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; }) \
            || die "apt-get could not install redis-server"
    elif command -v sudo >/dev/null; then
        (sudo DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null || { sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; }) \
            || die "apt-get could not install redis-server"
    else
        die "the queue tests need Debian's redis-server: install it (apt-get install redis-server) and retry"
    fi
    # Debian's package starts a system service on port 6379; the tests start their own servers.
fi
