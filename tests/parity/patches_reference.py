"""ComfyUI 0.8's model-patch hook functions (FreeU, guidance patches, Differential Diffusion, Kohya
Deep Shrink), for diffloom's ports.

Usage: patches_reference.py OUT_DIR
Writes OUT_DIR/patches_expected.safetensors (float32 unless noted, CPU, deterministic: one seeded
torch.Generator, no network). ComfyUI is not imported: each closure body is copied verbatim from the
ComfyUI file named at its definition, with only the node plumbing (model.clone(), set_model_*_patch)
and device moves dropped. Numbers in keys are written with Python's repr (0.7, 1.0, 0.4 ...).

FreeU / FreeU_V2 (comfy_extras/nodes_freelunch.py), output_block_patch(h, hsp, transformer_options)
with model_channels = 32, so h with 128 channels uses (b1, s1), 64 channels (b2, s2), anything else is
returned untouched. v1: b1=1.1 b2=1.2 s1=0.9 s2=0.2; v2: b1=1.3 b2=1.4 s1=0.9 s2=0.2.
Cases <case> and their inputs (h is cloned before each call: ComfyUI scales it in place):
  freeu.h128      [2,128,6,8]   skip freeu.skip128      [2,128,6,8]
  freeu.h64       [2,64,12,16]  skip freeu.skip64       [2,64,12,16]
  freeu.h32       [2,32,12,16]  skip freeu.skip32       [2,32,12,16]   (no scale: returned as is)
  freeu.h128_odd  [1,128,5,7]   skip freeu.skip128_odd  [1,128,5,7]    (odd H and W)
  freeu.h64_thin  [1,64,1,9]    skip freeu.skip64_thin  [1,64,1,9]     (H = 1: the Fourier mask's row
                                                                        slice is [-1:1], i.e. row 0)
Outputs: freeu.v1.<case>.h, freeu.v1.<case>.skip, freeu.v2.<case>.h, freeu.v2.<case>.skip.

Guidance, on inputs
  cfg.x [2,4,8,8] (noisy latent, std 10), cfg.cond, cfg.uncond [2,4,8,8] (denoised predictions),
  cfg.sigma [2] = 3.2 (args["sigma"] as comfy/samplers.py passes it: the timestep tensor),
  cond_scale = 6.5 (a Python float, not stored).
  rescale.<m>     RescaleCFG (comfy_extras/nodes_model_advanced.py), multiplier m in 0.7, 0.0, through
                  comfy/samplers.py cfg_function's sampler_cfg_function path:
                  x - rescale_cfg({"cond": x - cond, "uncond": x - uncond, "cond_scale", "sigma", "input": x})
  cfgzero         CFGZeroStar (comfy_extras/nodes_cfg.py) as a post-cfg function on the default cfg
                  uncond + (cond - uncond) * cond_scale
  cfgnorm.<s>     CFGNorm (comfy_extras/nodes_cfg.py), strength s in 1.0, 0.5, post-cfg likewise
  eps.1.05        Epsilon Scaling (comfy_extras/nodes_eps.py), factor 1.05, post-cfg likewise
  tsr.0.9         TemporalScoreRescaling (comfy_extras/nodes_eps.py), k 0.9, tsr_sigma 1.3, post-cfg likewise
                  (SD's half log-SNR is -log sigma)
  tcfg            TCFG (comfy_extras/nodes_tcfg.py): the pre-cfg damping of the uncond, then the default cfg
SAG (comfy_extras/nodes_sag.py): sag.q/k/v [2,16,32] -> attention_basic_with_sim with 2 heads: sag.out,
  sag.sim [4,16,16]; create_blur_map(sag.x0 [1,4,8,16], 4·sim[:2], sigma 2, threshold 1): sag.blurred
APG (comfy_extras/nodes_apg.py), pre_cfg_function, then the default cfg on its returned pair:
  apg.cond.<i>, apg.uncond.<i> [2,4,8,8] for i = 0, 1, 2 (batch element 0: |cond - uncond| ~ 22, above
  the norm threshold; element 1: ~ 1, below it), apg.sigmas [3] = 3.2, 2.1, 5.0.
  apg.out.<i>     one closure (eta=0.5, norm_threshold=5.0, momentum=0.3) called for i = 0, 1, 2 in order
                  with sigma = apg.sigmas[i] (a [2] tensor filled); the third sigma is higher than the
                  second, so the running average restarts there
  apg.plain       a fresh closure with eta=1, norm_threshold=0, momentum=0 on apg.cond.0 / apg.uncond.0,
                  sigma 3.2. NB: this equals uncond + (cond - uncond) * (cond_scale + 1), not plain cfg.
DifferentialDiffusion.forward (comfy_extras/nodes_differential_diffusion.py) with SD1's
ModelSamplingDiscrete (comfy/model_sampling.py: linear betas 0.00085..0.012, 1000 steps):
  diff.run_sigmas [6] = 14.6146, 7.0, 3.0, 1.0, 0.3, 0.0 (extra_options["sigmas"])
  diff.mask [1,4,8,8] smooth gradient in [0, 1] (exact 0 and 1 at the corners)
  diff.<strength>.<k>   forward(sigma=run_sigmas[k:k+1], mask, strength) for strength in 1.0, 0.4 and
                        k = 0..4
  diff.threshold [5]    (debug aid) the threshold each k compares the mask with
                        ((current_ts - ts_to) / (ts_from - ts_to), int64 timesteps, float32 division)
  diff.timesteps [5] int64 (debug aid) timestep(run_sigmas[k])
PatchModelAddDownscale (comfy_extras/nodes_model_downscale.py), block_number 3, downscale_factor 2.0,
start_percent 0.0, end_percent 0.35, downscale_method "bicubic", upscale_method "bilinear":
  shrink.h [1,32,13,17] -> shrink.down: input_block_patch at block ("input", 3), sigma 14.6 (in range).
                  Size: round(17 * 0.5) x round(13 * 0.5) with Python's round (half to even), i.e.
                  W=8, H=6 -> shrink.down is [1,32,6,8]
  shrink.up_h [1,32,7,9], shrink.up_skip [1,32,13,17] -> shrink.up [1,32,13,17]: output_block_patch
                  (the skip comes back unchanged)
  shrink.sigma_end [] (debug aid) percent_to_sigma(0.35) for SD1, the lower bound of the active range
comfy.utils.common_upscale is inlined for 4-D inputs, no crop: F.interpolate(s, size=(height, width),
mode=method), align_corners left at its default (None, which behaves as False).
"""

import math
import os
import sys
import types

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


# ---------------------------------------------------------------------------------------------
# comfy/utils.py common_upscale, 4-D samples, crop "disabled", methods other than bislerp/lanczos
def common_upscale(samples, width, height, upscale_method, crop):
    assert crop == "disabled" and samples.ndim == 4 and upscale_method not in ("bislerp", "lanczos")
    s = samples
    out = torch.nn.functional.interpolate(s, size=(height, width), mode=upscale_method)
    return out


# ---------------------------------------------------------------------------------------------
# comfy_extras/nodes_freelunch.py
def Fourier_filter(x, threshold, scale):
    # FFT
    x_freq = torch.fft.fftn(x.float(), dim=(-2, -1))
    x_freq = torch.fft.fftshift(x_freq, dim=(-2, -1))

    B, C, H, W = x_freq.shape
    mask = torch.ones((B, C, H, W), device=x.device)

    crow, ccol = H // 2, W //2
    mask[..., crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    x_freq = x_freq * mask

    # IFFT
    x_freq = torch.fft.ifftshift(x_freq, dim=(-2, -1))
    x_filtered = torch.fft.ifftn(x_freq, dim=(-2, -1)).real

    return x_filtered.to(x.dtype)


def freeu_v1(model_channels, b1, b2, s1, s2):
    # FreeU.execute, CPU path (the on_cpu_devices fallback only moves hsp to the CPU)
    scale_dict = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def output_block_patch(h, hsp, transformer_options):
        scale = scale_dict.get(int(h.shape[1]), None)
        if scale is not None:
            h[:,:h.shape[1] // 2] = h[:,:h.shape[1] // 2] * scale[0]
            hsp = Fourier_filter(hsp, threshold=1, scale=scale[1])

        return h, hsp

    return output_block_patch


def freeu_v2(model_channels, b1, b2, s1, s2):
    # FreeU_V2.execute, CPU path
    scale_dict = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def output_block_patch(h, hsp, transformer_options):
        scale = scale_dict.get(int(h.shape[1]), None)
        if scale is not None:
            hidden_mean = h.mean(1).unsqueeze(1)
            B = hidden_mean.shape[0]
            hidden_max, _ = torch.max(hidden_mean.view(B, -1), dim=-1, keepdim=True)
            hidden_min, _ = torch.min(hidden_mean.view(B, -1), dim=-1, keepdim=True)
            hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)

            h[:,:h.shape[1] // 2] = h[:,:h.shape[1] // 2] * ((scale[0] - 1 ) * hidden_mean + 1)

            hsp = Fourier_filter(hsp, threshold=1, scale=scale[1])

        return h, hsp

    return output_block_patch


# ---------------------------------------------------------------------------------------------
# comfy_extras/nodes_model_advanced.py RescaleCFG.patch
def make_rescale_cfg(multiplier):
    def rescale_cfg(args):
        cond = args["cond"]
        uncond = args["uncond"]
        cond_scale = args["cond_scale"]
        sigma = args["sigma"]
        sigma = sigma.view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
        x_orig = args["input"]

        #rescale cfg has to be done on v-pred model output
        x = x_orig / (sigma * sigma + 1.0)
        cond = ((x - (x_orig - cond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
        uncond = ((x - (x_orig - uncond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)

        #rescalecfg
        x_cfg = uncond + cond_scale * (cond - uncond)
        ro_pos = torch.std(cond, dim=(1,2,3), keepdim=True)
        ro_cfg = torch.std(x_cfg, dim=(1,2,3), keepdim=True)

        x_rescaled = x_cfg * (ro_pos / ro_cfg)
        x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg

        return x_orig - (x - x_final * sigma / (sigma * sigma + 1.0) ** 0.5)

    return rescale_cfg


# comfy_extras/nodes_cfg.py
def optimized_scale(positive, negative):
    positive_flat = positive.reshape(positive.shape[0], -1)
    negative_flat = negative.reshape(negative.shape[0], -1)

    # Calculate dot production
    dot_product = torch.sum(positive_flat * negative_flat, dim=1, keepdim=True)

    # Squared norm of uncondition
    squared_norm = torch.sum(negative_flat ** 2, dim=1, keepdim=True) + 1e-8

    # st_star = v_cond^T * v_uncond / ||v_uncond||^2
    st_star = dot_product / squared_norm

    return st_star.reshape([positive.shape[0]] + [1] * (positive.ndim - 1))


def cfg_zero_star(args):
    # CFGZeroStar.execute
    guidance_scale = args['cond_scale']
    x = args['input']
    cond_p = args['cond_denoised']
    uncond_p = args['uncond_denoised']
    out = args["denoised"]
    alpha = optimized_scale(x - cond_p, x - uncond_p)

    return out + uncond_p * (alpha - 1.0)  + guidance_scale * uncond_p * (1.0 - alpha)


def make_cfg_norm(strength):
    # CFGNorm.execute
    def cfg_norm(args):
        cond_p = args['cond_denoised']
        pred_text_ = args["denoised"]

        norm_full_cond = torch.norm(cond_p, dim=1, keepdim=True)
        norm_pred_text = torch.norm(pred_text_, dim=1, keepdim=True)
        scale = (norm_full_cond / (norm_pred_text + 1e-8)).clamp(min=0.0, max=1.0)
        return pred_text_ * scale * strength

    return cfg_norm


# comfy/samplers.py cfg_function (model, timestep-as-sigma and the cond/uncond conditioning dicts
# are passed through unused by these patches)
def cfg_function(cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}):
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep, "input": x, "sigma": timestep,
                "cond_denoised": cond_pred, "uncond_denoised": uncond_pred, "model": None, "model_options": model_options, "input_cond": None, "input_uncond": None}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale

    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": None, "uncond": None, "cond_scale": cond_scale, "model": None, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)

    return cfg_result


# ---------------------------------------------------------------------------------------------
# comfy_extras/nodes_apg.py
def project(v0, v1):
    v1 = torch.nn.functional.normalize(v1, dim=[-1, -2, -3])
    v0_parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    v0_orthogonal = v0 - v0_parallel
    return v0_parallel, v0_orthogonal


def make_apg(eta, norm_threshold, momentum):
    # APG.execute
    running_avg = 0
    prev_sigma = None

    def pre_cfg_function(args):
        nonlocal running_avg, prev_sigma

        if len(args["conds_out"]) == 1:
            return args["conds_out"]

        cond = args["conds_out"][0]
        uncond = args["conds_out"][1]
        sigma = args["sigma"][0]
        cond_scale = args["cond_scale"]

        if prev_sigma is not None and sigma > prev_sigma:
            running_avg = 0
        prev_sigma = sigma

        guidance = cond - uncond

        if momentum != 0:
            if not torch.is_tensor(running_avg):
                running_avg = guidance
            else:
                running_avg = momentum * running_avg + guidance
            guidance = running_avg

        if norm_threshold > 0:
            guidance_norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
            scale = torch.minimum(
                torch.ones_like(guidance_norm),
                norm_threshold / guidance_norm
            )
            guidance = guidance * scale

        guidance_parallel, guidance_orthogonal = project(guidance, cond)
        modified_guidance = guidance_orthogonal + eta * guidance_parallel

        modified_cond = (uncond + modified_guidance) + (cond - uncond) / cond_scale

        return [modified_cond, uncond] + args["conds_out"][2:]

    return pre_cfg_function


# ---------------------------------------------------------------------------------------------
# comfy/ldm/modules/diffusionmodules/util.py make_beta_schedule ("linear") and
# comfy/model_sampling.py ModelSamplingDiscrete (SD1 defaults, zsnr off)
class ModelSamplingDiscrete(torch.nn.Module):
    def __init__(self, linear_start=0.00085, linear_end=0.012, timesteps=1000):
        super().__init__()
        betas = (
                torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        )
        alphas = 1. - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.set_sigmas(sigmas)
        self.sigma_data = 1.0

    def set_sigmas(self, sigmas):
        self.register_buffer('sigmas', sigmas.float())
        self.register_buffer('log_sigmas', sigmas.log().float())

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=(len(self.sigmas) - 1))
        low_idx = t.floor().long()
        high_idx = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        percent = 1.0 - percent
        return self.sigma(torch.tensor(percent * 999.0)).item()


# comfy_extras/nodes_differential_diffusion.py DifferentialDiffusion.forward
def differential_diffusion_forward(sigma: torch.Tensor, denoise_mask: torch.Tensor, extra_options: dict, strength: float):
    model = extra_options["model"]
    step_sigmas = extra_options["sigmas"]
    sigma_to = model.inner_model.model_sampling.sigma_min
    if step_sigmas[-1] > sigma_to:
        sigma_to = step_sigmas[-1]
    sigma_from = step_sigmas[0]

    ts_from = model.inner_model.model_sampling.timestep(sigma_from)
    ts_to = model.inner_model.model_sampling.timestep(sigma_to)
    current_ts = model.inner_model.model_sampling.timestep(sigma[0])

    threshold = (current_ts - ts_to) / (ts_from - ts_to)

    # Generate the binary mask based on the threshold
    binary_mask = (denoise_mask >= threshold).to(denoise_mask.dtype)

    # Blend binary mask with the original denoise_mask using strength
    if strength and strength < 1:
        blended_mask = strength * binary_mask + (1 - strength) * denoise_mask
        return blended_mask
    else:
        return binary_mask


def differential_diffusion_threshold(sigma, extra_options):
    # the first half of forward, for the debug tensors
    model = extra_options["model"]
    step_sigmas = extra_options["sigmas"]
    sigma_to = model.inner_model.model_sampling.sigma_min
    if step_sigmas[-1] > sigma_to:
        sigma_to = step_sigmas[-1]
    sigma_from = step_sigmas[0]
    ts_from = model.inner_model.model_sampling.timestep(sigma_from)
    ts_to = model.inner_model.model_sampling.timestep(sigma_to)
    current_ts = model.inner_model.model_sampling.timestep(sigma[0])
    return (current_ts - ts_to) / (ts_from - ts_to), current_ts


# ---------------------------------------------------------------------------------------------
# comfy_extras/nodes_model_downscale.py PatchModelAddDownscale.execute
def make_downscale(model_sampling, block_number, downscale_factor, start_percent, end_percent, downscale_method, upscale_method):
    sigma_start = model_sampling.percent_to_sigma(start_percent)
    sigma_end = model_sampling.percent_to_sigma(end_percent)

    def input_block_patch(h, transformer_options):
        if transformer_options["block"][1] == block_number:
            sigma = transformer_options["sigmas"][0].item()
            if sigma <= sigma_start and sigma >= sigma_end:
                h = common_upscale(h, round(h.shape[-1] * (1.0 / downscale_factor)), round(h.shape[-2] * (1.0 / downscale_factor)), downscale_method, "disabled")
        return h

    def output_block_patch(h, hsp, transformer_options):
        if h.shape[2] != hsp.shape[2]:
            h = common_upscale(h, hsp.shape[-1], hsp.shape[-2], upscale_method, "disabled")
        return h, hsp

    return input_block_patch, output_block_patch, sigma_end


# ---------------------------------------------------------------------------------------------
def main(out_dir):
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(20240607)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * scale

    out = {}

    # --- FreeU ---------------------------------------------------------------------------------
    cases = {
        "h128": ((2, 128, 6, 8), (2, 128, 6, 8)),
        "h64": ((2, 64, 12, 16), (2, 64, 12, 16)),
        "h32": ((2, 32, 12, 16), (2, 32, 12, 16)),
        "h128_odd": ((1, 128, 5, 7), (1, 128, 5, 7)),
        "h64_thin": ((1, 64, 1, 9), (1, 64, 1, 9)),
    }
    for case, (hshape, sshape) in cases.items():
        h = randn(*hshape) + 0.5 * randn(1, hshape[1], 1, 1)  # per-channel offsets: a non-flat channel mean
        skip = randn(*sshape) + 0.3
        out[f"freeu.{case}"] = h
        out[f"freeu.skip{case[1:]}"] = skip
        for ver, patch in (("v1", freeu_v1(32, 1.1, 1.2, 0.9, 0.2)), ("v2", freeu_v2(32, 1.3, 1.4, 0.9, 0.2))):
            rh, rs = patch(h.clone(), skip.clone(), {})
            out[f"freeu.{ver}.{case}.h"] = rh
            out[f"freeu.{ver}.{case}.skip"] = rs

    # --- guidance ------------------------------------------------------------------------------
    cond_scale = 6.5
    x = randn(2, 4, 8, 8, scale=10.0)
    cond = 0.4 * x / 10.0 + randn(2, 4, 8, 8, scale=0.8)
    uncond = 0.4 * x / 10.0 + randn(2, 4, 8, 8, scale=0.8)
    sigma = torch.full((2,), 3.2, dtype=torch.float32)
    out["cfg.x"], out["cfg.cond"], out["cfg.uncond"], out["cfg.sigma"] = x, cond, uncond, sigma

    for m in (0.7, 0.0):
        out[f"rescale.{m!r}"] = cfg_function(cond, uncond, cond_scale, x, sigma,
                                             {"sampler_cfg_function": make_rescale_cfg(m)})
    out["cfgzero"] = cfg_function(cond, uncond, cond_scale, x, sigma, {"sampler_post_cfg_function": [cfg_zero_star]})
    for s in (1.0, 0.5):
        out[f"cfgnorm.{s!r}"] = cfg_function(cond, uncond, cond_scale, x, sigma,
                                             {"sampler_post_cfg_function": [make_cfg_norm(s)]})

    # Epsilon Scaling (comfy_extras/nodes_eps.py), post-CFG: eps.<f>
    def make_eps(scaling_factor):
        def epsilon_scaling_function(args):
            denoised = args["denoised"]
            x = args["input"]
            noise_pred = x - denoised
            scaled_noise_pred = noise_pred / scaling_factor
            return x - scaled_noise_pred
        return epsilon_scaling_function
    out["eps.1.05"] = cfg_function(cond, uncond, cond_scale, x, sigma, {"sampler_post_cfg_function": [make_eps(1.05)]})

    # TSR (comfy_extras/nodes_eps.py), post-CFG, with SD's sigma_to_half_log_snr = -log(sigma): tsr.<k>
    def make_tsr(tsr_k, tsr_sigma):
        tsr_variance = tsr_sigma ** 2
        def temporal_score_rescaling(args):
            denoised = args["denoised"]
            x = args["input"]
            sigma = args["sigma"]
            if tsr_k == 1 or sigma == 0:
                return denoised
            half_log_snr = -torch.log(sigma)   # comfy/samplers.py sigma_to_half_log_snr for EPS/V
            snr = (2 * half_log_snr).exp()
            if snr == 0:
                return denoised
            posinf_mask = torch.isposinf(snr)
            rescaling_factor = (snr * tsr_variance + 1) / (snr * tsr_variance / tsr_k + 1)
            rescaling_r = torch.where(posinf_mask, tsr_k, rescaling_factor)
            alpha = sigma * half_log_snr.exp()
            return torch.lerp(x / alpha, denoised, rescaling_r)
        return temporal_score_rescaling
    one_sigma = torch.tensor([3.2], dtype=torch.float32)   # one row's sigma (sigma == 0 is compared)
    out["tsr.0.9"] = cfg_function(cond, uncond, cond_scale, x, one_sigma, {"sampler_post_cfg_function": [make_tsr(0.9, 1.3)]})

    # TCFG (comfy_extras/nodes_tcfg.py), pre-CFG then the default cfg: tcfg
    def score_tangential_damping(cond_score, uncond_score):
        batch_num = cond_score.shape[0]
        cond_score_flat = cond_score.reshape(batch_num, 1, -1).float()
        uncond_score_flat = uncond_score.reshape(batch_num, 1, -1).float()
        score_matrix = torch.cat((uncond_score_flat, cond_score_flat), dim=1)
        _, _, Vh = torch.linalg.svd(score_matrix, full_matrices=False)
        v1 = Vh[:, 0:1, :].to(uncond_score_flat.device)
        uncond_score_td = (uncond_score_flat @ v1.transpose(-2, -1)) * v1
        return uncond_score_td.reshape_as(uncond_score).to(uncond_score.dtype)
    uncond_td = x - score_tangential_damping(x - cond, x - uncond)
    out["tcfg"] = uncond_td + (cond - uncond_td) * cond_scale

    # SAG (comfy_extras/nodes_sag.py): attention_basic_with_sim on q, k, v (2 heads) and create_blur_map
    # of an uncond prediction with those scores: sag.*
    def attention_basic_with_sim(q, k, v, heads):
        b, _, dim_head = q.shape
        dim_head //= heads
        scale = dim_head ** -0.5
        q, k, v = map(lambda t: t.unsqueeze(3).reshape(b, -1, heads, dim_head).permute(0, 2, 1, 3)
                      .reshape(b * heads, -1, dim_head).contiguous(), (q, k, v))
        sim = torch.einsum('b i d, b j d -> b i j', q, k) * scale
        sim = sim.softmax(dim=-1)
        out = torch.einsum('b i j, b j d -> b i d', sim.to(v.dtype), v)
        out = out.unsqueeze(0).reshape(b, heads, -1, dim_head).permute(0, 2, 1, 3).reshape(b, -1, heads * dim_head)
        return out, sim

    def gaussian_blur_2d(img, kernel_size, sigma):
        ksize_half = (kernel_size - 1) * 0.5
        xk = torch.linspace(-ksize_half, ksize_half, steps=kernel_size)
        pdf = torch.exp(-0.5 * (xk / sigma).pow(2))
        x_kernel = pdf / pdf.sum()
        x_kernel = x_kernel.to(device=img.device, dtype=img.dtype)
        kernel2d = torch.mm(x_kernel[:, None], x_kernel[None, :])
        kernel2d = kernel2d.expand(img.shape[-3], 1, kernel2d.shape[0], kernel2d.shape[1])
        padding = [kernel_size // 2, kernel_size // 2, kernel_size // 2, kernel_size // 2]
        img = torch.nn.functional.pad(img, padding, mode="reflect")
        return torch.nn.functional.conv2d(img, kernel2d, groups=img.shape[-3])

    def create_blur_map(x0, attn, sigma=3.0, threshold=1.0):
        _, hw1, hw2 = attn.shape
        b, _, lh, lw = x0.shape
        attn = attn.reshape(b, -1, hw1, hw2)
        mask = attn.mean(1, keepdim=False).sum(1, keepdim=False) > threshold
        total = mask.shape[-1]
        xg = round(math.sqrt((lh / lw) * total))
        xx = None
        for i in range(0, math.floor(math.sqrt(total) / 2)):
            for j in [(xg + i), max(1, xg - i)]:
                if total % j == 0:
                    xx = j
                    break
            if xx is not None:
                break
        xg = xx
        yg = total // xg
        mask = mask.reshape(b, xg, yg).unsqueeze(1).type(attn.dtype)
        mask = torch.nn.functional.interpolate(mask, (lh, lw))
        blurred = gaussian_blur_2d(x0, kernel_size=9, sigma=sigma)
        return blurred * mask + x0 * (1 - mask)

    sq, sk, sv = randn(2, 16, 32), randn(2, 16, 32), randn(2, 16, 32)
    s_out, s_sim = attention_basic_with_sim(sq, sk, sv, 2)
    out["sag.q"], out["sag.k"], out["sag.v"], out["sag.out"], out["sag.sim"] = sq, sk, sv, s_out, s_sim
    s_x0 = randn(1, 4, 8, 16)
    out["sag.x0"] = s_x0
    out["sag.blurred"] = create_blur_map(s_x0, s_sim[:2] * 4.0, 2.0, 1.0)

    # --- APG -----------------------------------------------------------------------------------
    apg_sigmas = [3.2, 2.1, 5.0]
    out["apg.sigmas"] = torch.tensor(apg_sigmas, dtype=torch.float32)
    diff_scale = torch.tensor([1.0, 0.05]).view(2, 1, 1, 1)
    pairs = []
    for i in range(3):
        c = randn(2, 4, 8, 8)
        u = c + randn(2, 4, 8, 8) * diff_scale
        out[f"apg.cond.{i}"], out[f"apg.uncond.{i}"] = c, u
        pairs.append((c, u))
    apg = make_apg(0.5, 5.0, 0.3)
    for i, (c, u) in enumerate(pairs):
        s = torch.full((2,), apg_sigmas[i], dtype=torch.float32)
        res = apg({"conds": [None, None], "conds_out": [c, u], "cond_scale": cond_scale, "timestep": s,
                   "input": x, "sigma": s, "model": None, "model_options": {}})
        out[f"apg.out.{i}"] = cfg_function(res[0], res[1], cond_scale, x, s)
    apg_plain = make_apg(1.0, 0.0, 0.0)
    s = torch.full((2,), 3.2, dtype=torch.float32)
    c, u = pairs[0]
    res = apg_plain({"conds": [None, None], "conds_out": [c, u], "cond_scale": cond_scale, "timestep": s,
                     "input": x, "sigma": s, "model": None, "model_options": {}})
    out["apg.plain"] = cfg_function(res[0], res[1], cond_scale, x, s)
    assert torch.allclose(out["apg.plain"], u + (c - u) * (cond_scale + 1), atol=1e-4)

    # --- Differential Diffusion ----------------------------------------------------------------
    ms = ModelSamplingDiscrete()
    stub = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms))
    run_sigmas = torch.tensor([14.6146, 7.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float32)
    lin = torch.linspace(0.0, 1.0, 8, dtype=torch.float32)
    base = 0.55 * lin.view(1, 8) + 0.45 * lin.view(8, 1)
    mask = torch.stack([base.clamp(0, 1) ** (0.5 + 0.5 * ch) for ch in range(4)]).unsqueeze(0).contiguous()
    out["diff.run_sigmas"], out["diff.mask"] = run_sigmas, mask
    extra = {"model": stub, "sigmas": run_sigmas}
    thresholds, tss = [], []
    for k in range(5):
        sig = run_sigmas[k:k + 1].clone()
        t, ts = differential_diffusion_threshold(sig, extra)
        thresholds.append(t)
        tss.append(ts)
        for strength in (1.0, 0.4):
            out[f"diff.{strength!r}.{k}"] = differential_diffusion_forward(sig, mask, extra, strength)
    out["diff.threshold"] = torch.stack(thresholds).to(torch.float32)
    out["diff.timesteps"] = torch.stack(tss).to(torch.int64)

    # --- Deep shrink ---------------------------------------------------------------------------
    down_patch, up_patch, sigma_end = make_downscale(ms, 3, 2.0, 0.0, 0.35, "bicubic", "bilinear")
    out["shrink.sigma_end"] = torch.tensor(sigma_end, dtype=torch.float32)
    hs = randn(1, 32, 13, 17)
    out["shrink.h"] = hs
    out["shrink.down"] = down_patch(hs.clone(), {"block": ("input", 3), "sigmas": torch.tensor([14.6])})
    assert tuple(out["shrink.down"].shape) == (1, 32, 6, 8), out["shrink.down"].shape
    up_h, up_skip = randn(1, 32, 7, 9), randn(1, 32, 13, 17)
    out["shrink.up_h"], out["shrink.up_skip"] = up_h, up_skip
    rh, rs = up_patch(up_h.clone(), up_skip.clone(), {})
    assert torch.equal(rs, up_skip)
    out["shrink.up"] = rh

    # --- write ---------------------------------------------------------------------------------
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}
    for k, v in out.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        assert torch.isfinite(v.float()).all(), k
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "patches_expected.safetensors")
    save_file(out, path)

    def d(a, b):
        return (out[a] - out[b]).abs().max().item()

    print(f"wrote {len(out)} tensors to {path}")
    print(f"freeu v1 h128 |dh| {d('freeu.v1.h128.h', 'freeu.h128'):.4f} |dskip| {d('freeu.v1.h128.skip', 'freeu.skip128'):.4f}; "
          f"v2 h64 |dh| {d('freeu.v2.h64.h', 'freeu.h64'):.4f} |dskip| {d('freeu.v2.h64.skip', 'freeu.skip64'):.4f}; "
          f"h32 |dh| {d('freeu.v1.h32.h', 'freeu.h32'):.1f}; thin |dskip| {d('freeu.v1.h64_thin.skip', 'freeu.skip64_thin'):.4f}")
    plain = out["cfg.uncond"] + (out["cfg.cond"] - out["cfg.uncond"]) * cond_scale
    for k in ("rescale.0.7", "rescale.0.0", "cfgzero", "cfgnorm.1.0", "cfgnorm.0.5"):
        print(f"{k}: |out| {out[k].abs().max().item():.3f}, |out - cfg| {(out[k] - plain).abs().max().item():.4f}")
    for i in range(3):
        plain = out[f"apg.uncond.{i}"] + (out[f"apg.cond.{i}"] - out[f"apg.uncond.{i}"]) * cond_scale
        print(f"apg.out.{i}: |out - cfg| {(out[f'apg.out.{i}'] - plain).abs().max().item():.4f}")
    print(f"diff timesteps {out['diff.timesteps'].tolist()}, thresholds {[round(t, 4) for t in out['diff.threshold'].tolist()]}, "
          f"mean of diff.1.0.<k> {[round(out[f'diff.1.0.{k}'].mean().item(), 3) for k in range(5)]}")
    print(f"shrink.sigma_end {sigma_end:.4f}; shrink.down {tuple(out['shrink.down'].shape)} std {out['shrink.down'].std().item():.3f}; "
          f"shrink.up {tuple(out['shrink.up'].shape)} std {out['shrink.up'].std().item():.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
