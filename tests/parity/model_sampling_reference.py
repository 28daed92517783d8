#!/usr/bin/env python3
"""Reference values for ModelSamplingDiscrete's sampling types, from diffusers' schedulers (PyPI
diffusers, pinned in requirements.txt), for tests/sampling.rs.

Usage: model_sampling_reference.py OUT.safetensors

Writes:
- `zsnr.sigmas`: the SD schedule (scaled-linear betas 0.00085..0.012, 1000 steps) through diffusers'
  `rescale_zero_terminal_snr` (Lin et al. 2023), as sigma = sqrt((1 - alphā) / alphā), float64. The last
  alphā is 0 there (sigma = inf); ComfyUI sets it to 4.8973451890853435e-08 instead, so the test
  compares all but the last.
- `lcm.timesteps`: the training timesteps LCMScheduler keeps for 50 original steps (int64), and
  `lcm.sigmas`: the SD sigmas at those timesteps, ascending.
- `lcm.c_skip`, `lcm.c_out`: LCMScheduler's boundary-condition scalings at those timesteps.
"""
import sys

import torch
from diffusers import LCMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from safetensors.torch import save_file


def sd_betas():
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2


def sigmas_of(betas):
    ac = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - ac) / ac) ** 0.5


def main(out_path):
    out = {"zsnr.sigmas": sigmas_of(rescale_zero_terminal_snr(sd_betas()))[:-1].contiguous()}
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         original_inference_steps=50, timestep_scaling=10.0)
    sched.set_timesteps(50)
    timesteps = sched.timesteps.flip(0).to(torch.int64)
    out["lcm.timesteps"] = timesteps.contiguous()
    out["lcm.sigmas"] = sigmas_of(sd_betas())[timesteps].contiguous()
    scalings = [sched.get_scalings_for_boundary_condition_discrete(int(t)) for t in timesteps]
    out["lcm.c_skip"] = torch.tensor([s[0] for s in scalings], dtype=torch.float64)
    out["lcm.c_out"] = torch.tensor([s[1] for s in scalings], dtype=torch.float64)
    print(f"zsnr sigma[998] {out['zsnr.sigmas'][-1].item():.3f}; lcm timesteps {timesteps[:3].tolist()}..{timesteps[-1].item()}")
    save_file(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
