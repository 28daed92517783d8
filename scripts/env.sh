# Sourced by the other scripts: points tch's build (torch-sys) at the libtorch inside the project venv.
# tch 0.26 is built against libtorch 2.13.0, which the torch==2.13.0 wheel from PyPI carries under
# site-packages/torch (lib/ and include/); the wheel is built with the C++11 ABI.
DIFFLOOM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIFFLOOM_VENV=$DIFFLOOM_ROOT/.venv
LIBTORCH=
for d in "$DIFFLOOM_VENV"/lib/python3*/site-packages/torch; do [[ -d $d ]] && LIBTORCH=$d; done
# The fixed link scripts/setup.sh makes (and .cargo/config.toml names): the same LIBTORCH for scripted
# and plain cargo runs, so neither rebuilds libtorch's bindings for the other.
[[ -n $LIBTORCH && -d $DIFFLOOM_VENV/libtorch/lib ]] && LIBTORCH=$DIFFLOOM_VENV/libtorch
export DIFFLOOM_ROOT DIFFLOOM_VENV LIBTORCH
export LIBTORCH_CXX11_ABI=1
# The CLIP tokenizer vocabulary scripts/setup.sh writes (see nodes/src/tokenizer.rs).
export DIFFLOOM_CLIP_VOCAB_DIR=${DIFFLOOM_CLIP_VOCAB_DIR:-$DIFFLOOM_ROOT/models/clip-tokenizer}
