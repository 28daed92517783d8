#!/usr/bin/env python3
"""Reference trajectories of the samplers, from the k-diffusion package (PyPI 0.1.1.post1, the family
ComfyUI's samplers come from), for diffloom's sampler parity tests.

Usage: sampler_reference.py SPEC.json OUT.safetensors

SPEC: {"seed": int, "shape": [b, c, h, w], "sigmas": [...], "samplers": [...],
       "model": "toy" | {"ckpt": path, "context_seed": int}, "noise_seeds": [[seed, [shape]], ...]}

The toy denoiser is exact for Gaussian data N(0, a): denoised = x·a/(a + σ²), a = 0.5. With "ckpt", the
denoiser is the tiny UNet as tests/parity/reference.py loads it (diffusers' own conversion), called the
way ComfyUI calls a model: input x/√(σ²+1), timestep = nearest training step in log sigma, eps
prediction, denoised = x − eps·σ. Per-step noise comes from `comfy_default_noise_sampler` below, the
body of ComfyUI 0.8's `default_noise_sampler` (comfy/k_diffusion/sampling.py, since ComfyUI PR #11528:
a private generator on x's device, seeded with seed + 1 on the CPU); the starting x is
`torch.manual_seed(seed); torch.randn(shape)` (ComfyUI's prepare_noise) times sigmas[0].

Writes, per sampler, `<name>.x` (the callback's x at every step, then the final x: [steps+1, ...]) and
`<name>.denoised` ([steps, ...]); for each noise seed, `noise.<i>` = torch.manual_seed(s); torch.randn(shape);
for each of "step_noise_seeds": [[seed, shape, draws], ...], `step_noise.<i>` = the first draws of
comfy_default_noise_sampler on a CPU tensor of that shape ([draws, ...]), and `step_noise.<i>.overflow`
where ComfyUI cannot seed it (then the draws are those of seed 0).
Convention notes: for dpmpp_sde the tree is queried at the listed sigma, as ComfyUI queries it (see
below). ComfyUI's lms returns the denoised estimate on the step to sigma 0 (k-diffusion
integrates it); ComfyUI's euler_ancestral returns denoised when sigma_down is 0 (k-diffusion takes an
Euler step to the same point). The Rust test compares accordingly.
"""
import importlib.util
import inspect
import json
import os
import sys
import types

import numpy as np

os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def import_k_diffusion_sampling():
    """k_diffusion/__init__.py imports its training stack (wandb, clean-fid, …); only sampling.py and
    utils.py are needed, and utils.py's torchvision import is unused by the samplers."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        sys.exit("k-diffusion is not installed: run scripts/setup.sh")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = pkg
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        stubs = {"torchvision": tv, "torchvision.transforms": tv.transforms,
                 "torchvision.transforms.functional": tv.transforms.functional}
        sys.modules.update(stubs)
    import k_diffusion.sampling as sampling  # noqa: E402
    for name in stubs:  # diffusers probes for torchvision later; it must not find the stub
        del sys.modules[name]
    return sampling


K = import_k_diffusion_sampling()


def diffusers_unipc(model, x0, sigmas, bh2):
    """UniPC as ComfyUI runs it, computed by diffusers' UniPCMultistepScheduler (the UniPC authors'
    port; k-diffusion has no UniPC): data prediction, solver order 3 with lower orders at both ends,
    ComfyUI's 0.001 in place of a final sigma of 0, x in variance-preserving scale."""
    from diffusers import UniPCMultistepScheduler
    s = sigmas.clone()
    if s[-1] == 0:
        s[-1] = 0.001
    n = len(s) - 1
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=3, prediction_type="epsilon",
                                    predict_x0=True, solver_type="bh2" if bh2 else "bh1", lower_order_final=True)
    sched.set_timesteps(n)
    sched.sigmas = s.clone()  # the step arithmetic reads these (VE sigmas) at each step index
    x = x0 / (1 + s[0] ** 2) ** 0.5
    for i in range(n):
        sig = s[i]
        x_ve = x * (1 + sig ** 2) ** 0.5
        eps = (x_ve - model(x_ve, sig.reshape(1))) / sig
        x = sched.step(eps, sched.timesteps[i], x).prev_sample
    # diffusers applies each step's corrector at the start of the next one, so only the final latent
    # (no corrector on the last step, in both) lines up with ComfyUI's.
    return [x * (1 + s[-1] ** 2) ** 0.5]


def sd_log_sigmas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - ac) / ac) ** 0.5).log().float()


def unet_denoiser(spec):
    sys.path.insert(0, os.path.dirname(__file__))
    import reference  # noqa: E402  (the same diffusers-based loading as the model parity)
    from safetensors import safe_open
    with safe_open(spec["ckpt"], "pt") as f:
        cfg = json.loads(f.metadata()["diffloom.config"])
    from safetensors.torch import load_file
    ckpt = load_file(spec["ckpt"])
    unet = reference.build_unet(cfg, reference.original_config(cfg), ckpt)
    g = torch.Generator().manual_seed(spec.get("context_seed", 1))
    ctx = torch.randn(1, 77, cfg["unet"]["context_dim"], generator=g)
    log_sigmas = sd_log_sigmas()

    def denoise(x, sigma):
        s = sigma.reshape(-1)[0].float()
        t = (s.log() - log_sigmas[:, None]).abs().argmin(dim=0).float().expand(x.shape[0])
        eps = unet(x / (s ** 2 + 1) ** 0.5, t, encoder_hidden_states=ctx.expand(x.shape[0], -1, -1)).sample
        return x - eps * s
    return denoise, ctx


def comfy_default_noise_sampler(x, seed):
    """ComfyUI 0.8's default_noise_sampler, as it reads (comfy/k_diffusion/sampling.py)."""
    if x.device == torch.device("cpu"):
        seed += 1
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)


def main(spec_path, out_path):
    torch.set_grad_enabled(False)
    with open(spec_path) as f:
        spec = json.load(f)
    out = {}
    if spec["model"] == "toy":
        model = lambda x, sigma: x * (0.5 / (0.5 + sigma.reshape(-1)[0] ** 2))  # noqa: E731
    else:
        model, ctx = unet_denoiser(spec["model"])
        out["context"] = ctx.contiguous()
    sigmas = torch.tensor(spec["sigmas"], dtype=torch.float32)
    for name in spec["samplers"]:
        torch.manual_seed(spec["seed"])
        x0 = torch.randn(spec["shape"]) * sigmas[0]
        noise_sampler = comfy_default_noise_sampler(x0, spec["seed"])
        xs, ds = [], []

        def callback(info):
            xs.append(info["x"].clone())
            ds.append(info["denoised"].clone())
        if name in ("uni_pc", "uni_pc_bh2"):
            xs = diffusers_unipc(model, x0, sigmas, name == "uni_pc_bh2")
            out[name + ".final"] = xs[-1].contiguous()
            continue
        fn = getattr(K, "sample_" + name)
        kwargs = {"callback": callback, "disable": True}
        if name in ("dpm_fast", "dpm_adaptive"):
            # ComfyUI's wrappers: from sigmas[0] to the last non-zero sigma (dpm_fast: one model call per step).
            lo = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]
            extra = {"n": len(sigmas) - 1} if name == "dpm_fast" else {}
            final = fn(model, x0, float(lo), float(sigmas[0]), noise_sampler=noise_sampler, disable=True, **extra)
            if isinstance(final, tuple):
                final = final[0]
            out[name + ".final"] = final.contiguous()
            print(f"{name}: final mean|x| {final.abs().mean().item():.6f}")
            continue
        if "sde" in name:
            # ComfyUI seeds the Brownian tree with the run's seed (upstream draws a random one).
            tree = K.BrownianTreeNoiseSampler(x0, sigmas[sigmas > 0].min(), sigmas.max(), seed=spec["seed"])
            if name == "dpmpp_sde":
                # Upstream queries the tree at exp(−(−log σ)), ComfyUI at the listed σ itself; the tree
                # rounds query times to 6 decimals, so one float32 ulp can move the point. Snap to
                # ComfyUI's (only values within 1e-6 of a listed sigma move).
                def snap(s, listed=sigmas):
                    near = listed[(listed - s).abs().argmin()]
                    return near if (near - s).abs() <= 1e-6 * near else s
                kwargs["noise_sampler"] = lambda s, sn, tree=tree: tree(snap(s), snap(sn))
            else:
                kwargs["noise_sampler"] = tree
        elif "noise_sampler" in inspect.signature(fn).parameters:  # (through the no_grad wrapper)
            kwargs["noise_sampler"] = noise_sampler
        final = fn(model, x0, sigmas, **kwargs)
        out[name + ".x"] = torch.stack(xs + [final]).contiguous()
        out[name + ".denoised"] = torch.stack(ds).contiguous()
        print(f"{name}: {len(ds)} steps, final mean|x| {final.abs().mean().item():.6f}")
    for i, (seed, shape) in enumerate(spec.get("noise_seeds", [])):
        torch.manual_seed(seed)
        out[f"noise.{i}"] = torch.randn(shape)
    for i, (seed, shape, draws) in enumerate(spec.get("step_noise_seeds", [])):
        x = torch.zeros(shape)
        try:
            noise_sampler = comfy_default_noise_sampler(x, seed)
        except (RuntimeError, ValueError, OverflowError) as e:
            # seed + 1 = 2^64 does not fit a generator's seed: ComfyUI fails here. Record that, and the
            # numbers of seed 0 (what diffloom wraps to) for comparison.
            print(f"step noise seed {seed}: {type(e).__name__}: {e}")
            out[f"step_noise.{i}.overflow"] = torch.ones(1)
            generator = torch.Generator().manual_seed(0)
            noise_sampler = lambda s, sn, g=generator, x=x: torch.randn(x.size(), generator=g)  # noqa: E731
        out[f"step_noise.{i}"] = torch.stack([noise_sampler(None, None) for _ in range(draws)]).contiguous()
    for sched in spec.get("schedules", []):
        # k-diffusion's own schedule functions, and numpy's interpolation as ComfyUI's loglinear_interp
        # uses it (on the Align Your Steps SD1 levels).
        kind, args = sched[0], sched[1:]
        if kind == "polyexponential":
            out["polyexponential"] = K.get_sigmas_polyexponential(*args).to(torch.float64)
        elif kind == "vp":
            # ComfyUI's copy of get_sigmas_vp takes expm1 where k-diffusion 0.1.1 has exp(...) - 1,
            # which loses digits at small t; the rest is k-diffusion's.
            n, beta_d, beta_min, eps_s = args
            t = torch.linspace(1, eps_s, n)
            out["vp"] = torch.cat([torch.sqrt(torch.special.expm1(beta_d * t ** 2 / 2 + beta_min * t)), torch.zeros(1)]).to(torch.float64)
            out["vp.k_diffusion"] = K.get_sigmas_vp(*args).to(torch.float64)
        elif kind == "loglinear":
            levels = np.array([14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                               0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582])
            xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
            interped = np.exp(np.interp(np.linspace(0, 1, args[0]), xs, ys))[::-1].copy()
            out[f"loglinear.{args[0]}"] = torch.from_numpy(interped)
    for n in spec.get("karras_exponential_steps", []):
        out[f"karras.{n}"] = K.get_sigmas_karras(n, 0.029167158529162407, 14.614641189575195)
        out[f"exponential.{n}"] = K.get_sigmas_exponential(n, 0.029167158529162407, 14.614641189575195)
    save_file(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
