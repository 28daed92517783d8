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

want=$(sha256sum requirements.txt | cut -d' ' -f1)
stamp=$DIFFLOOM_VENV/.diffloom-requirements
if [[ -f $stamp && $(cat "$stamp") == "$want" && -n $LIBTORCH ]]; then
    exit 0
fi
echo "setup: installing requirements.txt into .venv (torch 2.13.0 is ~3 GB with its CUDA libraries; about a minute)"
[[ -x $DIFFLOOM_VENV/bin/python ]] || "$PYTHON" -m venv "$DIFFLOOM_VENV"
"$DIFFLOOM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r requirements.txt \
    || die "pip could not install requirements.txt (is the package registry reachable?)"
echo "$want" > "$stamp"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[[ -f $LIBTORCH/include/torch/csrc/api/include/torch/torch.h ]] || die "the torch wheel in .venv carries no libtorch headers at $LIBTORCH"
echo "setup: done (LIBTORCH=$LIBTORCH)"
