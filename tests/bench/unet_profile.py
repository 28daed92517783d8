"""Where a UNet forward's time goes: torch.profiler over diffusers' SD 1.5 UNet on the full-size
random checkpoint (the same weights, inputs and libtorch kernels as the model benchmark's), per kind of
kernel, and how much of the wall time is spent outside libtorch's kernels (Python and dispatch): the
most any framework-side change could save. diffloom calls the same ATen kernels with the same shapes.
Then the attention alternatives for the UNet's shapes: the fused SDPA kernel both use against the
explicit matmul-softmax-matmul path, per dtype, with their largest difference from fp32 SDPA.

Usage: unet_profile.py CKPT.safetensors [fp32|bf16 ...]   (scripts/bench.sh profile)
"""
import os
import sys
import time
from collections import defaultdict

os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from unet_reference import load  # noqa: E402

KINDS = [
    ("convolution", ("convolution",)),
    ("matmul (linear, attention projections, bmm)", ("addmm", "::mm", "bmm", "matmul", "linear", "baddbmm")),
    ("attention (SDPA, softmax)", ("scaled_dot_product", "softmax", "flash_attention")),
    ("GroupNorm / LayerNorm", ("group_norm", "layer_norm")),
    ("activations (SiLU, GELU)", ("silu", "gelu")),
    ("elementwise, copies, reshapes", ("add", "mul", "copy", "cat", "clone", "contiguous", "::to", "_to_copy", "empty", "div", "chunk", "view", "reshape", "permute", "transpose", "upsample", "fill", "split", "slice", "select", "expand", "narrow", "arange", "exp", "sin", "cos", "sub", "pow", "rsqrt", "mean", "var", "neg")),
]


def kind_of(name):
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def main(path, dtypes):
    torch.set_grad_enabled(False)
    unet, vae = load(path)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        unet = unet.to(dtype)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 64, 64, generator=g).to(dtype)
        t = torch.tensor([500.0, 500.0])
        ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
        report(f"UNet forward, batch 2, 64x64 latents, {name}", lambda: unet(x, t, encoder_hidden_states=ctx))
    vae = vae.to(torch.float32)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    report("VAE decode, one 64x64 latent (512x512 image), fp32", lambda: vae.decode(z))


def report(title, run):
    """Runs `run` once to warm up, once plainly and once under the profiler; prints where time went."""
    run()
    start = time.perf_counter()
    run()
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    by_kind = defaultdict(float)
    by_op = defaultdict(float)
    for e in prof.key_averages():
        # Self time: each kernel counted once, not again in the ops that call it.
        by_kind[kind_of(e.key)] += e.self_cpu_time_total / 1e6
        by_op[e.key] += e.self_cpu_time_total / 1e6
    in_ops = sum(by_kind.values())
    print(f"\n{title}: {plain:.2f} s unprofiled, {wall:.2f} s profiled, {in_ops:.2f} s inside ATen ops "
          f"({100 * in_ops / wall:.1f}%), {wall - in_ops:.2f} s outside them (Python, module calls, dispatch)")
    for kind, secs in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<48} {secs:6.2f} s  {100 * secs / wall:5.1f}%")
    print("  top kernels:")
    for op, secs in sorted(by_op.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {op:<46} {secs:6.2f} s  {100 * secs / wall:5.1f}%")


def best_of(f, n=3):
    f()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def attention_paths(dtypes):
    """SDPA against matmul-softmax-matmul for the SD 1.5 UNet's self- and cross-attention shapes
    (batch 2 × 8 heads, 64×64 latents)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    print("\nattention per call, batch 2 x 8 heads: fused SDPA (what diffusers and diffloom call) vs explicit matmuls")
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        for lq, lk, d in [(4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (4096, 77, 40), (1024, 77, 80)]:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(2, 8, n, d, generator=g) for n in (lq, lk, lk))
            reference = sdpa(q, k, v)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

            def explicit():
                return torch.matmul((torch.matmul(q * d ** -0.5, k.transpose(-1, -2))).softmax(-1), v)

            fused_s, explicit_s = best_of(lambda: sdpa(q, k, v)), best_of(explicit)
            fused_err = (sdpa(q, k, v).float() - reference).abs().max().item()
            explicit_err = (explicit().float() - reference).abs().max().item()
            print(f"  {name} {lq:5}x{lk:<5} head {d:3}: SDPA {1000 * fused_s:7.1f} ms (err {fused_err:.1e})   "
                  f"matmuls {1000 * explicit_s:7.1f} ms (err {explicit_err:.1e})   {explicit_s / fused_s:4.2f}x")


if __name__ == "__main__":
    dtypes = sys.argv[2:] or ["fp32", "bf16"]
    main(sys.argv[1], dtypes)
    attention_paths(dtypes)
