#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU and its own PyTorch but no Rust toolchain or network
# (the lent machines): the CUDA tests (tests/gpu.rs: device selection and fp16, GPU = CPU in fp32,
# ancestral noise as torch draws it on the device, LoRA on the device, out-of-memory tile retry), the
# UNet benchmark against diffusers (tests/bench/gpu_bench.rs) and txt2img end to end with its peak
# VRAM, in about 6 minutes; one summary table at the end.
#
# Prepare here: scripts/gpu_build.sh <that machine's torch version> (default 2.11.0), which fills
# .gpu/bin (binaries built against that libtorch, the CLIP vocabulary) and .gpu/whl (diffusers).
# Run there, from the repository root, carrying .gpu/bin and .gpu/whl: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=$PWD/.gpu/bin
py=${DIFFLOOM_GPU_PYTHON:-python3}
export DIFFLOOM_GPU_PYTHON=$py
[[ -x $bin/diffloom ]] || { echo "gpu_check: $bin/diffloom is missing: run scripts/gpu_build.sh first and carry .gpu/bin" >&2; exit 2; }
torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
    || { echo "gpu_check: $py has no torch" >&2; exit 2; }
have=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
want=$(cat "$bin/TORCH_VERSION")
[[ $have == "$want" ]] || { echo "gpu_check: built for torch $want, this machine has $have: scripts/gpu_build.sh $have" >&2; exit 2; }
# The binaries load this machine's libtorch (libtorch_cuda finds its CUDA libraries itself).
export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DIFFLOOM_CLIP_VOCAB_DIR=$bin/clip-tokenizer
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
work=$(mktemp -d)
summary=()
check() { # NAME COMMAND...: runs it, shows its tail, records PASS/FAIL and seconds
    local name=$1 start=$SECONDS status=FAIL
    shift
    echo "== $name: $*"
    if "$@" >"$work/$name.log" 2>&1; then status=PASS; fi
    tail -n 15 "$work/$name.log"
    summary+=("| $name | $status | $((SECONDS - start)) s |")
}

check version "$bin/diffloom" --version -v
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for t in gpu_device_and_fp16_default gpu_fp32_matches_the_cpu gpu_ancestral_noise_is_torchs_on_the_device \
    gpu_lora_patching_matches_the_cpu gpu_vae_decode_keeps_to_free_memory gpu_vae_decode_out_of_memory_retries_in_tiles; do
    check "$t" "$bin/gpu-tests" --ignored --exact "$t" --nocapture --test-threads 1
done
check full_model "$bin/make-test-models" "$work/models" --full-sd1
ckpt=$work/models/full-sd1.safetensors
check unet_bench env DIFFLOOM_GPU_REFERENCE=tests/bench/gpu_reference.py "$bin/gpu-bench" "$ckpt" 20
# txt2img end to end (process start to PNG) with the peak of the GPU's used memory, sampled.
(while sleep 0.2; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1; done) >"$work/vram.log" &
sampler=$!
check txt2img_512 "$bin/diffloom" run graphs/txt2img.ron --device cuda -o "$work/out" --no-disk-cache -v \
    --set "ckpt=$ckpt" --set steps=20 --set width=512 --set height=512
kill $sampler 2>/dev/null
peak=$(sort -n "$work/vram.log" | tail -n 1)

echo
echo "## GPU check ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1), torch $have)"
echo "| check | result | time |"
echo "| --- | --- | --- |"
printf '%s\n' "${summary[@]}"
echo
grep -A 6 '^UNet fp16' "$work/unet_bench.log" || true
echo "txt2img 512², 20 steps, fp16: peak GPU memory used ${peak:-?} MiB (nvidia-smi, whole device)"
grep -E 'ran|peak' "$work/txt2img_512.log" | head -n 12 || true
[[ ! " ${summary[*]} " =~ FAIL ]]
