#!/usr/bin/env python3
"""Reference runs of diffusers' DDPMScheduler and LCMScheduler (PyPI diffusers, pinned) on the toy
denoiser, for the ddpm and lcm samplers' parity tests (tests/sampling.rs).

Usage: scheduler_reference.py SPEC.json OUT.safetensors

SPEC: {"seed": int, "shape": [b, c, h, w], "ddpm_timesteps": [...], "lcm_steps": int}

The toy model is exact for Gaussian data N(0, 0.5) (as in sampler_reference.py), asked as diffusers
asks a UNet: for a VP sample at timestep t, with σ_t = √((1 − alphā_t)/alphā_t) and x = sample·√(1 + σ²),
the noise prediction is (x − D(x, σ))/σ with D(x, σ) = x·0.5/(0.5 + σ²). The start is
`torch.manual_seed(seed); torch.randn(shape)` (ComfyUI's initial noise) scaled to the first timestep.
The step noise comes from a CPU generator seeded with seed + 1, which is how ComfyUI 0.8's
default_noise_sampler seeds it on the CPU and what diffloom draws: the same numbers in the same order.

Writes `ddpm.sigmas` (σ of each timestep, then 0), `ddpm.x` (the VE latent x = sample·√(1 + σ²) after
each step, the final one at σ = 0), and the same for `lcm.*` (LCMScheduler with 50 original steps and
timestep scaling 10, `lcm.timesteps` the timesteps it chose).
"""
import json
import sys

import torch
from diffusers import DDPMScheduler, LCMScheduler
from safetensors.torch import save_file

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def sigma_of(scheduler, t):
    ac = scheduler.alphas_cumprod[int(t)].double()
    return ((1 - ac) / ac).sqrt().item()


def eps_model(sample, sigma):
    x = sample * (1 + sigma ** 2) ** 0.5
    denoised = x * (0.5 / (0.5 + sigma ** 2))
    return (x - denoised) / sigma


def run(scheduler, timesteps, seed, shape):
    sigmas = [sigma_of(scheduler, t) for t in timesteps] + [0.0]
    torch.manual_seed(seed)
    x0 = torch.randn(shape) * sigmas[0]
    sample = x0 / (1 + sigmas[0] ** 2) ** 0.5
    generator = torch.Generator().manual_seed(seed + 1)
    xs = []
    for i, t in enumerate(scheduler.timesteps):
        eps = eps_model(sample, sigmas[i]).float()
        sample = scheduler.step(eps, t, sample, generator=generator).prev_sample
        xs.append(sample * (1 + sigmas[i + 1] ** 2) ** 0.5)
    return torch.tensor(sigmas, dtype=torch.float64), torch.stack(xs).contiguous()


def main(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    out = {}
    ddpm = DDPMScheduler(**SD, variance_type="fixed_small", clip_sample=False, prediction_type="epsilon")
    ddpm.set_timesteps(timesteps=spec["ddpm_timesteps"])
    out["ddpm.sigmas"], out["ddpm.x"] = run(ddpm, spec["ddpm_timesteps"], spec["seed"], spec["shape"])
    lcm = LCMScheduler(**SD, original_inference_steps=50, timestep_scaling=10.0, prediction_type="epsilon")
    lcm.set_timesteps(spec["lcm_steps"])
    timesteps = [int(t) for t in lcm.timesteps]
    out["lcm.timesteps"] = torch.tensor(timesteps, dtype=torch.int64)
    out["lcm.sigmas"], out["lcm.x"] = run(lcm, timesteps, spec["seed"], spec["shape"])
    print(f"ddpm: {len(spec['ddpm_timesteps'])} steps; lcm timesteps {timesteps}")
    save_file(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
