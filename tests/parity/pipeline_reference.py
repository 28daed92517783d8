#!/usr/bin/env python3
"""Reference img2img / inpaint / ControlNet txt2img results from diffusers' own pipelines, for diffloom's
end-to-end parity tests.

Usage:  .venv/bin/python tests/parity/pipeline_reference.py MODE CKPT IN.safetensors OUT.safetensors
        .venv/bin/python tests/parity/pipeline_reference.py controlnet CKPT IN.safetensors OUT.safetensors CONTROLNET

MODE is "img2img" (StableDiffusionImg2ImgPipeline) or "inpaint" (StableDiffusionInpaintPipeline, with the
4- or 9-channel UNet the checkpoint has); "controlnet" (StableDiffusionControlNetPipeline) is described at
the end. CKPT is a tiny single-file checkpoint, converted by diffusers' own single-file code (reference.py's
builders). fp32, CPU, offline.

IN (written by the Rust test):
  image [1,H,W,3] in 0..1 (H, W multiples of 8); mask [1,H,W] in {0,1}, 1 = repaint, constant on the
  8-pixel grid (inpaint only); sigmas [steps+1], the ComfyUI KSampler sigma list (ends with 0);
  timesteps [steps], ComfyUI's integer UNet timesteps for sigmas[:-1]; seed int64 [1]; cfg [1];
  prompt_embeds, negative_prompt_embeds [1,77,ctx] (passed as prompt_embeds=, so the text encoder is
  not part of this comparison).
OUT: out.latent [1,4,H/8,W/8] (final latent / scaling_factor = ComfyUI LATENT units), out.image [1,H,W,3]
  in 0..1 (VAE decode, (x/2+0.5).clamp(0,1)), out.noise [1,4,H/8,W/8] (the noise the pipeline drew:
  torch.Generator().manual_seed(seed), one randn of the latent shape, = ComfyUI prepare_noise).

How ComfyUI's KSampler semantics are obtained from the stock pipelines (see the notes in the test):
* The input image enters as a latent: vae.encode(image*2-1).latent_dist.mode() * scaling_factor (ComfyUI's
  VAEEncode takes the mode; the pipelines would sample the posterior with the generator). For inpaint also
  masked_image_latents = mode(encode((image*2-1) * (mask < 0.5))) * scaling_factor, as the pipeline forms
  the masked image itself (masked pixels = 0.5 grey), i.e. ComfyUI's InpaintModelConditioning.
* Scheduler: EulerDiscreteScheduler (SD1 config) whose only change is that set_timesteps puts ComfyUI's
  integer timesteps in `timesteps` (what the UNet is fed); sigmas and stepping stay diffusers'.
* Steps: the pipelines take a full sigma list plus a strength and skip the head of it. Only the tail is
  known here, so one placeholder sigma (the model's sigma_max, never sampled at) is put in front:
  sigmas=[sigma_max] + IN.sigmas, N = steps+1, strength = (steps+0.5)/(steps+1) -> get_timesteps keeps
  int(N*strength) = steps steps, begin_index = 1, so add_noise and the first step use IN.sigmas[0]. strength
  < 1 also keeps the inpaint pipeline off its pure-noise (strength == 1) branch.
Everything above is checked while the pipeline runs (UNet timesteps and inputs, add_noise sigmas and noise,
scheduler indices); the script exits with an error if anything differs.

MODE controlnet: txt2img with one ControlNet, for the graph CheckpointLoaderSimple -> CLIPTextEncode x2 ->
LoadImage -> Canny -> ControlNetLoader + ControlNetApplyAdvanced (strength 1, start 0, end 1) ->
EmptyLatentImage (batch 1) -> KSampler (euler, normal, denoise 1.0, cfg >= 1) -> VAEDecode.
CONTROLNET is a ControlNet-1.1 single file (`control_model.` keys, "diffloom.config" metadata), loaded by
controlnet_reference.build_controlnet (diffusers' create_controlnet_diffusers_config_from_ldm +
convert_controlnet_checkpoint, with its workaround for the 0.42.1 missing-`checkpoint` bug).
IN: hint [1,H,W,3] in 0..1 (the Canny output, a ComfyUI IMAGE; H, W multiples of 8); sigmas [steps+1], the
  full KSampler sigma list, sigmas[0] = the model's sigma_max (denoise 1); timesteps, seed, cfg,
  prompt_embeds, negative_prompt_embeds as above.
OUT: out.latent, out.image, out.noise as above (out.latent [1,4,H/8,W/8]).
How ComfyUI's semantics are obtained from the stock pipeline:
* Initial latent: ComfyUI's KSampler sees sigmas[0] ~ sigma_max (max_denoise) and starts from
  zero latent + noise * sqrt(1 + sigmas[0]^2), noise = randn(latent shape, Generator().manual_seed(seed)).
  The pipeline draws the same randn from the generator and multiplies by scheduler.init_noise_sigma, which
  EulerDiscreteScheduler makes max(sigmas) for timestep_spacing "linspace"/"trailing" and
  (max(sigmas)^2 + 1) ** 0.5 otherwise. So the scheduler here is the SD1 one with timestep_spacing="leading":
  max(sigmas) = sigmas[0] (the list decreases) and (s^2+1)**0.5 equals torch.sqrt(1 + s^2) bit for bit (checked
  at run time, before and while the pipeline runs). With explicit `sigmas`, set_timesteps never reads
  timestep_spacing (nor steps_offset): only its num_inference_steps branch does, and init_noise_sigma is
  its only other reader (checked at run time: both spacings give the same sigmas and timesteps).
* Scheduler otherwise as above (EulerComfyT: ComfyUI's integer timesteps to the UNet and the ControlNet),
  sigmas = IN.sigmas as given (no placeholder, no strength: txt2img runs every step).
* The ControlNet gets the hint as [1,3,H,W] 0..1 tensor: the pipeline's control_image_processor does not
  normalise, and at the image's own size its resize is the identity; it is repeated for the two CFG halves.
  ControlNet input = the UNet's input, x / (sigma^2+1)**0.5, with the same text states (both CFG halves,
  guess_mode False), conditioning_scale 1.0 (= strength; ComfyUI multiplies every residual by strength),
  control_guidance_start/end 0/1 (applied at every step, as ComfyUI's 0..1 percent range).
* CFG batch: diffusers [uncond, cond], ComfyUI [cond, uncond]; each half is computed on its own, so the
  order does not change the result; both form uncond + cfg * (cond - uncond).
Checked while the pipeline runs: UNet and ControlNet timesteps = IN.timesteps; their inputs =
cat(x, x) / (sigma^2+1)**0.5 with x the scheduler's current sample and both see [negative, positive];
controlnet_cond = the hint; the conditioning scale; the UNet receives the ControlNet's residuals; the initial
latent = noise * sqrt(1 + sigmas[0]^2) (computed as ComfyUI does); the scheduler's sigmas = IN.sigmas and it
steps through indices 0..steps-1.
"""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from diffusers import (EulerDiscreteScheduler, StableDiffusionControlNetPipeline,  # noqa: E402
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

import controlnet_reference as cnr  # noqa: E402
import reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where the set-up put the CLIP vocabulary (scripts/env.sh: $DIFFLOOM_CLIP_VOCAB_DIR, else models/clip-tokenizer).
TOKENIZER_DIR = os.environ.get("DIFFLOOM_CLIP_VOCAB_DIR") or os.path.join(ROOT, "models", "clip-tokenizer")
SD1_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon", timestep_spacing="linspace", interpolation_type="linear",
                     use_karras_sigmas=False, final_sigmas_type="zero", steps_offset=1)
# ControlNetApplyAdvanced strength, passed as controlnet_conditioning_scale (a module constant so that a
# throwaway driver can set it to 0 to see the ControlNet's effect; the Rust test uses 1).
CONTROLNET_STRENGTH = 1.0


def fail(msg):
    sys.exit(f"pipeline_reference.py: error: {msg}")


class EulerComfyT(EulerDiscreteScheduler):
    """EulerDiscreteScheduler that feeds the UNet ComfyUI's integer timesteps (nearest log-sigma index)
    instead of its own fractional ones. Nothing else changes: step/add_noise index `sigmas` by
    step_index/begin_index. The signature names sigmas/timesteps because retrieve_timesteps inspects it."""
    comfy_t = None

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps, sigmas=sigmas)
        if self.comfy_t is not None:
            if len(self.comfy_t) != len(self.timesteps):
                fail(f"scheduler made {len(self.timesteps)} timesteps, {len(self.comfy_t)} given")
            self.timesteps = torch.as_tensor(self.comfy_t, dtype=torch.float32)


def comfy_sigma_table():
    """ComfyUI ModelSamplingDiscrete (scaled_linear): sigmas in f64, stored .float(); log taken in f64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0)
    s = ((1.0 - ac) / ac) ** 0.5
    return s.float(), s.log().float()


def check_timesteps(sigmas, timesteps):
    """IN.timesteps must be ComfyUI's model_sampling.timestep(sigma) = argmin |log sigma - log_sigmas|."""
    _, log_table = comfy_sigma_table()
    dist = (sigmas[:-1].log()[None, :] - log_table[:, None]).abs()  # [1000, steps]
    want = dist.argmin(0).float()
    for i in torch.nonzero(want != timesteps).flatten().tolist():
        t_in = int(timesteps[i])
        if not 0 <= t_in < 1000 or timesteps[i] != t_in:
            fail(f"timesteps[{i}] = {float(timesteps[i])} is not an integer in 0..999")
        gap = float(dist[t_in, i] - dist[int(want[i]), i])
        if gap > 1e-6:
            fail(f"timesteps[{i}] = {t_in} for sigma {float(sigmas[i])}; ComfyUI's nearest log-sigma index is "
                 f"{int(want[i])}")
        ref.warn(f"timesteps[{i}] = {t_in}, ComfyUI's argmin gives {int(want[i])}: a tie (|d log sigma| "
                 f"differs by {gap:.1e}); using the given one")


def read_inputs(in_path, image_key, extra=()):
    """IN's common tensors, checked: (x, image [1,H,W,3], sigmas, timesteps, seed, cfg, cond, uncond)."""
    x = load_file(in_path)
    need = [image_key, "sigmas", "timesteps", "seed", "cfg", "prompt_embeds", "negative_prompt_embeds", *extra]
    missing = [k for k in need if k not in x]
    if missing:
        fail(f"{in_path} lacks {missing}")
    image, sigmas, timesteps = x[image_key].float(), x["sigmas"].float(), x["timesteps"].float()
    seed, cfg = int(x["seed"].reshape(-1)[0]), float(x["cfg"].reshape(-1)[0])
    cond, uncond = x["prompt_embeds"].float(), x["negative_prompt_embeds"].float()
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[3] != 3:
        fail(f"{image_key} must be [1,H,W,3], got {list(image.shape)}")
    H, W = image.shape[1:3]
    if H % 8 or W % 8:
        fail(f"{image_key} size {H}x{W} is not a multiple of 8")
    if image.min() < 0 or image.max() > 1:
        fail(f"{image_key} values outside 0..1")
    steps = timesteps.numel()
    if sigmas.ndim != 1 or timesteps.ndim != 1 or sigmas.numel() != steps + 1 or steps < 1:
        fail(f"need sigmas [steps+1] and timesteps [steps], got {list(sigmas.shape)} and {list(timesteps.shape)}")
    if sigmas[-1] != 0 or not bool((sigmas[:-1] > 0).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        fail(f"sigmas must decrease strictly to a final 0: {sigmas.tolist()}")
    if cfg < 1.0:
        fail(f"cfg = {cfg} < 1: diffusers then drops the unconditional pass, ComfyUI does not")
    return x, image, sigmas, timesteps, seed, cfg, cond, uncond


def load_checkpoint(ckpt_path, cond, uncond):
    """The single-file checkpoint through diffusers' converters (reference.py): unet, vae, clip, tokenizer."""
    with safe_open(ckpt_path, "pt") as f:
        meta = f.metadata() or {}
    if "diffloom.config" not in meta:
        fail(f"{ckpt_path} has no 'diffloom.config' metadata")
    cfg_json = json.loads(meta["diffloom.config"])
    if cfg_json["prediction"] != "eps":
        fail(f"prediction {cfg_json['prediction']!r}: this reference is set up for eps models")
    ctx = cfg_json["unet"]["context_dim"]
    for name, t in (("prompt_embeds", cond), ("negative_prompt_embeds", uncond)):
        if list(t.shape) != [1, 77, ctx]:
            fail(f"{name} must be [1,77,{ctx}], got {list(t.shape)}")
    ckpt = load_file(ckpt_path)
    orig = ref.original_config(cfg_json)
    unet, vae, clip = ref.build_unet(cfg_json, orig, ckpt), ref.build_vae(orig, ckpt), ref.build_clip(cfg_json, ckpt)
    tok = CLIPTokenizer(os.path.join(TOKENIZER_DIR, "vocab.json"), os.path.join(TOKENIZER_DIR, "merges.txt"),
                        model_max_length=77, pad_token="<|endoftext|>")
    return unet, vae, clip, tok


def main():
    args = sys.argv[1:]
    if not ((len(args) == 4 and args[0] in ("img2img", "inpaint")) or (len(args) == 5 and args[0] == "controlnet")):
        sys.exit(__doc__)
    torch.set_grad_enabled(False)
    if args[0] == "controlnet":
        return controlnet_main(*args[1:])
    mode, ckpt_path, in_path, out_path = args

    # ---- inputs ----
    x, image, sigmas, timesteps, seed, cfg, cond, uncond = read_inputs(
        in_path, "image", ["mask"] if mode == "inpaint" else [])
    H, W = image.shape[1:3]
    steps = timesteps.numel()
    sig_table, _ = comfy_sigma_table()
    sigma_max = float(sig_table[-1])
    if float(sigmas[0]) >= sigma_max * (1 - 1e-5):
        fail(f"sigmas[0] = {float(sigmas[0])} is sigma_max: denoise = 1 (ComfyUI scales the noise by "
             "sqrt(1+sigma^2) and the inpaint pipeline drops the image there), not comparable")
    check_timesteps(sigmas, timesteps)
    mask = None
    if mode == "inpaint":
        mask = x["mask"].float()
        if list(mask.shape) != [1, H, W]:
            fail(f"mask must be [1,{H},{W}], got {list(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            fail("mask is not binary")
        blocks = mask.reshape(1, H // 8, 8, W // 8, 8)
        if not bool((blocks == blocks[:, :, :1, :, :1]).all()):
            fail("mask is not constant on the 8-pixel grid")
        mask = mask[:, None]  # [1,1,H,W], as the pipeline's mask_processor takes a tensor

    # ---- model ----
    unet, vae, clip, tok = load_checkpoint(ckpt_path, cond, uncond)
    in_ch = unet.config.in_channels
    if mode == "img2img" and in_ch != 4:
        fail(f"img2img needs a 4-channel UNet, {ckpt_path} has {in_ch}")
    sf = vae.config.scaling_factor

    # ---- latents (ComfyUI VAEEncode = posterior mode) ----
    px = image.permute(0, 3, 1, 2) * 2 - 1  # NCHW in [-1, 1]
    image_latents = vae.encode(px).latent_dist.mode() * sf
    kwargs = dict(image=image_latents)
    masked_latents = None
    if mode == "inpaint":
        masked_latents = vae.encode(px * (mask < 0.5)).latent_dist.mode() * sf
        kwargs.update(mask_image=mask, masked_image_latents=masked_latents, height=H, width=W)
    latent_shape = (1, 4, H // 8, W // 8)
    if tuple(image_latents.shape) != latent_shape:
        fail(f"VAE latent shape {tuple(image_latents.shape)}, expected {latent_shape}")

    # ---- schedule: placeholder head sigma + the given tail, strength keeps exactly `steps` steps ----
    sched_sigmas = torch.cat([torch.tensor([sigma_max]), sigmas])
    strength = (steps + 0.5) / (steps + 1)
    n_full = steps + 1
    if min(int(n_full * strength), n_full) != steps:
        fail(f"strength {strength} does not keep {steps} of {n_full} steps")

    sch = EulerComfyT(**SD1_SCHEDULER)
    sch.comfy_t = torch.cat([torch.tensor([999.0]), timesteps])  # the placeholder's t is skipped with it
    pipe_cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionInpaintPipeline
    pipe = pipe_cls(vae=vae, text_encoder=clip, tokenizer=tok, unet=unet, scheduler=sch,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    # ---- observers: record what the pipeline actually does (no change to it) ----
    unet_calls, noise_calls = [], []

    def unet_hook(_module, args, kw):
        sample, t = args[0], args[1]
        unet_calls.append((float(torch.as_tensor(t).reshape(-1)[0]), sample.clone(), kw["encoder_hidden_states"]))

    hook = pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)
    stock_add_noise = sch.add_noise

    def add_noise_observer(original, noise, t):
        if sch.begin_index is None:
            fail("add_noise called without begin_index: it would look sigmas up by timestep")
        idx = sch.step_index if sch.step_index is not None else sch.begin_index
        noise_calls.append((idx, float(sch.sigmas[idx]), noise.clone()))
        return stock_add_noise(original, noise, t)

    sch.add_noise = add_noise_observer

    def run(output_type):
        unet_calls.clear()
        noise_calls.clear()
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, sigmas=sched_sigmas.tolist(),
                    strength=strength, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed),
                    output_type=output_type, **kwargs).images

    latent = run("latent")
    hook.remove()

    # ---- checks of the run ----
    if not torch.equal(sch.sigmas[1:].float(), sigmas):
        fail(f"scheduler sigmas {sch.sigmas.tolist()} do not end with the given {sigmas.tolist()}")
    if sch.begin_index != 1 or sch.step_index != n_full:
        fail(f"scheduler begin_index={sch.begin_index} step_index={sch.step_index}; expected 1 and {n_full} "
             f"(= {steps} steps from sigmas[0])")
    got_t = [c[0] for c in unet_calls]
    if got_t != timesteps.tolist():
        fail(f"UNet was fed timesteps {got_t}, expected {timesteps.tolist()}")
    cfg_batch = 2 if cfg > 1 else 1
    for i, (_, sample, ehs) in enumerate(unet_calls):
        if sample.shape[0] != cfg_batch or sample.shape[1] != in_ch:
            fail(f"UNet call {i}: input {list(sample.shape)}, expected batch {cfg_batch} with {in_ch} channels")
        want_ctx = torch.cat([uncond, cond]) if cfg_batch == 2 else cond
        if not torch.equal(ehs, want_ctx):
            fail(f"UNet call {i}: encoder_hidden_states are not [negative, positive] as given")
        if in_ch == 9:  # concat order [x, mask, masked_image_latents], mask nearest-resized to latent size
            want_mask = torch.nn.functional.interpolate(mask, size=latent_shape[2:], mode="nearest")
            if not (torch.equal(sample[:, 4:5], want_mask.expand(cfg_batch, -1, -1, -1))
                    and torch.equal(sample[:, 5:], masked_latents.expand(cfg_batch, -1, -1, -1))):
                fail(f"UNet call {i}: 9-channel concat is not [x, mask, masked_image_latents]")
    want_noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    expected_idx = [1] + (list(range(2, n_full)) if mode == "inpaint" and in_ch == 4 else [])
    if [c[0] for c in noise_calls] != expected_idx:
        fail(f"add_noise used sigma indices {[c[0] for c in noise_calls]}, expected {expected_idx}")
    if noise_calls[0][1] != float(sigmas[0]):
        fail(f"the image was noised at sigma {noise_calls[0][1]}, not sigmas[0] = {float(sigmas[0])}")
    if not all(torch.equal(c[2], want_noise) for c in noise_calls):
        fail("the pipeline's noise is not torch.randn(latent shape, Generator().manual_seed(seed))")

    # ---- decode (what the pipeline's output_type="np" does), cross-checked against a second run ----
    out_latent = latent / sf
    decoded = (vae.decode(latent / sf).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    np_image = torch.from_numpy(run("np"))
    d_img = (np_image - decoded).abs().max().item()
    if d_img > 1e-6:
        fail(f"own decode differs from the pipeline's output_type='np' by {d_img:.2e}")

    extra = ""
    if mode == "inpaint" and in_ch == 4:  # diffusers blends the clean image latent back after the last step
        keep = (torch.nn.functional.interpolate(mask, size=latent_shape[2:], mode="nearest") < 0.5).expand(latent_shape)
        d_keep = (out_latent - image_latents / sf)[keep].abs().max().item() if keep.any() else 0.0
        if d_keep > 1e-5 * max(1.0, (image_latents / sf).abs().max().item()):
            fail(f"4-channel inpaint: kept region differs from the input latent by {d_keep:.2e}")
        extra = f" keep-region max|d|={d_keep:.1e}"

    save_file({"out.latent": out_latent.float().contiguous(), "out.image": decoded.float().contiguous(),
               "out.noise": want_noise.contiguous()}, out_path, metadata={"diffloom.mode": mode})
    print(f"{mode} {in_ch}ch {H}x{W} steps={steps} sigma0={float(sigmas[0]):.5f} t={[int(t) for t in timesteps]} "
          f"seed={seed} cfg={cfg} strength={strength:.6f}: out.latent max|x|={out_latent.abs().max().item():.4f} "
          f"out.image mean={decoded.mean().item():.6f}{extra} -> {out_path}")


def controlnet_main(ckpt_path, in_path, out_path, cn_path):
    """MODE controlnet: StableDiffusionControlNetPipeline, txt2img from ComfyUI's full sigma list (docstring)."""
    t_start = time.time()
    # ---- inputs ----
    _, hint, sigmas, timesteps, seed, cfg, cond, uncond = read_inputs(in_path, "hint")
    H, W = hint.shape[1:3]
    steps = timesteps.numel()
    sig_table, _ = comfy_sigma_table()
    sigma_max, sigma0 = float(sig_table[-1]), float(sigmas[0])
    # ComfyUI KSAMPLER.max_denoise: isclose(sigma_max, sigmas[0], rel_tol=1e-5) or sigmas[0] > sigma_max
    if not (math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max):
        fail(f"sigmas[0] = {sigma0} is not sigma_max = {sigma_max}: ComfyUI then scales the noise by sigmas[0], "
             "not sqrt(1+sigmas[0]^2); this mode bridges txt2img at denoise 1 only")
    check_timesteps(sigmas, timesteps)

    # ---- models ----
    unet, vae, clip, tok = load_checkpoint(ckpt_path, cond, uncond)
    if unet.config.in_channels != 4:
        fail(f"controlnet txt2img needs a 4-channel UNet, {ckpt_path} has {unet.config.in_channels}")
    cn_cfg, cn_ckpt = cnr.read(cn_path)
    ctx = cond.shape[-1]
    if cn_cfg["unet"]["context_dim"] != ctx:
        fail(f"{cn_path}: context_dim {cn_cfg['unet']['context_dim']}, the checkpoint's is {ctx}")
    if cn_cfg["hint_channels"] != 3:
        fail(f"{cn_path}: hint_channels {cn_cfg['hint_channels']}, an IMAGE hint has 3")
    controlnet = cnr.build_controlnet(cn_cfg, cn_ckpt)
    if controlnet.config.global_pool_conditions:
        fail("the ControlNet has global_pool_conditions: the pipeline would force guess_mode")
    if controlnet.config.controlnet_conditioning_channel_order != "rgb":
        fail(f"controlnet_conditioning_channel_order {controlnet.config.controlnet_conditioning_channel_order!r}")
    sf = vae.config.scaling_factor
    latent_shape = (1, 4, H // 8, W // 8)

    # ---- scheduler: SD1 Euler, ComfyUI's integer t, spacing "leading" -> init_noise_sigma = (s0^2+1)**0.5 ----
    probes = {}
    for spacing in ("linspace", "leading"):
        probes[spacing] = EulerDiscreteScheduler(**dict(SD1_SCHEDULER, timestep_spacing=spacing))
        probes[spacing].set_timesteps(sigmas=sigmas.tolist())
    if not (torch.equal(probes["linspace"].sigmas, probes["leading"].sigmas)
            and torch.equal(probes["linspace"].timesteps, probes["leading"].timesteps)):
        fail("timestep_spacing changes set_timesteps(sigmas=...) beyond init_noise_sigma")
    comfy_scale = torch.sqrt(1.0 + sigmas[0] ** 2.0)  # ComfyUI EPS.noise_scaling, max_denoise
    if not torch.equal(torch.as_tensor(probes["leading"].init_noise_sigma), comfy_scale):
        fail(f"init_noise_sigma {float(probes['leading'].init_noise_sigma)!r} with spacing 'leading' is not "
             f"sqrt(1 + sigmas[0]^2) = {float(comfy_scale)!r}")
    sch = EulerComfyT(**dict(SD1_SCHEDULER, timestep_spacing="leading"))
    sch.comfy_t = timesteps

    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=clip, tokenizer=tok, unet=unet,
                                             controlnet=controlnet, scheduler=sch, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    hint_nchw = hint.permute(0, 3, 1, 2).contiguous()  # ComfyUI ControlNetApplyAdvanced: image.movedim(-1, 1)

    # ---- observers (no change to what the pipeline does) ----
    unet_calls, cn_calls, cn_outs, step_calls = [], [], [], []

    def unet_hook(_m, args, kw):
        unet_calls.append(dict(t=float(torch.as_tensor(args[1]).reshape(-1)[0]), x=args[0].clone(),
                               ehs=kw["encoder_hidden_states"], down=kw.get("down_block_additional_residuals"),
                               mid=kw.get("mid_block_additional_residual")))

    def cn_hook(_m, args, kw):
        cn_calls.append(dict(t=float(torch.as_tensor(args[1]).reshape(-1)[0]), x=args[0].clone(),
                             ehs=kw["encoder_hidden_states"], cond=kw["controlnet_cond"].clone(),
                             scale=kw["conditioning_scale"], guess=kw["guess_mode"]))

    hooks = [pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True),
             pipe.controlnet.register_forward_pre_hook(cn_hook, with_kwargs=True),
             pipe.controlnet.register_forward_hook(lambda _m, _a, out: cn_outs.append(out))]
    stock_step = sch.step

    @functools.wraps(stock_step)  # the pipeline inspects step's signature (generator, eta)
    def step_observer(model_output, timestep, sample, *a, **kw):
        step_calls.append((sch.step_index, sample.clone()))
        return stock_step(model_output, timestep, sample, *a, **kw)

    sch.step = step_observer

    def run(output_type):
        for rec in (unet_calls, cn_calls, cn_outs, step_calls):
            rec.clear()
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=hint_nchw, height=H, width=W,
                    sigmas=sigmas.tolist(), guidance_scale=cfg, generator=torch.Generator().manual_seed(seed),
                    controlnet_conditioning_scale=CONTROLNET_STRENGTH, guess_mode=False, control_guidance_start=0.0,
                    control_guidance_end=1.0, output_type=output_type).images

    def check_run(label):
        if not torch.equal(sch.sigmas.float(), sigmas):
            fail(f"{label}: scheduler sigmas {sch.sigmas.tolist()} are not the given {sigmas.tolist()}")
        if [c[0] for c in step_calls] != list(range(steps)) or sch.step_index != steps:
            fail(f"{label}: scheduler stepped from indices {[c[0] for c in step_calls]} (ended at "
                 f"{sch.step_index}), expected 0..{steps - 1}")
        for name, calls in (("UNet", unet_calls), ("ControlNet", cn_calls)):
            got_t = [c["t"] for c in calls]
            if got_t != timesteps.tolist():
                fail(f"{label}: {name} was fed timesteps {got_t}, expected {timesteps.tolist()}")
        cfg_batch = 2 if cfg > 1 else 1
        want_ctx = torch.cat([uncond, cond]) if cfg_batch == 2 else cond
        want_hint = hint_nchw.expand(cfg_batch, -1, -1, -1)
        for i, (u, c, out, (_, x)) in enumerate(zip(unet_calls, cn_calls, cn_outs, step_calls)):
            # ComfyUI EPS.calculate_input: x / (sigma ** 2 + sigma_data ** 2) ** 0.5, sigma_data = 1
            want_x = torch.cat([x] * cfg_batch) / (sigmas[i] ** 2 + 1.0 ** 2) ** 0.5
            if not torch.equal(u["x"], want_x):
                fail(f"{label}: UNet input at step {i} is not x / sqrt(sigma^2+1) "
                     f"(max|d| {(u['x'] - want_x).abs().max().item():.2e})")
            if not torch.equal(c["x"], u["x"]):
                fail(f"{label}: ControlNet input at step {i} differs from the UNet's")
            if not (torch.equal(u["ehs"], want_ctx) and torch.equal(c["ehs"], want_ctx)):
                fail(f"{label}: step {i}: UNet/ControlNet text states are not [negative, positive] as given")
            if not torch.equal(c["cond"], want_hint):
                d = (c["cond"] - want_hint).abs().max().item() if c["cond"].shape == want_hint.shape else "-"
                fail(f"{label}: step {i}: controlnet_cond {list(c['cond'].shape)} is not the hint "
                     f"{list(want_hint.shape)} (max|d| {d})")
            if c["scale"] != CONTROLNET_STRENGTH or c["guess"]:
                fail(f"{label}: step {i}: conditioning_scale {c['scale']} guess_mode {c['guess']}, expected "
                     f"{CONTROLNET_STRENGTH} and False")
            if u["down"] is not out[0] or u["mid"] is not out[1]:
                fail(f"{label}: step {i}: the UNet did not get the ControlNet's residuals")
        if not len(unet_calls) == len(cn_calls) == len(cn_outs) == steps:
            fail(f"{label}: {len(unet_calls)} UNet / {len(cn_calls)} ControlNet calls for {steps} steps")
        init = step_calls[0][1]
        # ComfyUI: noise * torch.sqrt(1.0 + sigma ** 2.0), then += the (zero) EmptyLatentImage latent
        want_init = want_noise * comfy_scale + torch.zeros(latent_shape)
        if not torch.equal(init, want_init):
            fail(f"{label}: initial latent differs from noise * sqrt(1 + sigmas[0]^2) "
                 f"(max|d| {(init - want_init).abs().max().item():.2e}, ratio {(init / want_noise).mean().item()})")

    want_noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    latent = run("latent")
    check_run("latent run")
    mid0 = cn_outs[0][1].abs().max().item()
    out_latent = latent / sf
    decoded = (vae.decode(latent / sf).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    np_image = torch.from_numpy(run("np"))
    check_run("np run")
    for h in hooks:
        h.remove()
    d_img = (np_image - decoded).abs().max().item()
    if d_img > 1e-6:
        fail(f"own decode differs from the pipeline's output_type='np' by {d_img:.2e}")

    save_file({"out.latent": out_latent.float().contiguous(), "out.image": decoded.float().contiguous(),
               "out.noise": want_noise.contiguous()}, out_path, metadata={"diffloom.mode": "controlnet"})
    print(f"controlnet {H}x{W} steps={steps} sigma0={sigma0:.5f} init_noise_sigma={float(comfy_scale):.6f} "
          f"t={[int(t) for t in timesteps]} seed={seed} cfg={cfg} strength={CONTROLNET_STRENGTH}: "
          f"step-0 max|mid residual|={mid0:.4f} out.latent max|x|={out_latent.abs().max().item():.4f} "
          f"out.image mean={decoded.mean().item():.6f} -> {out_path} ({time.time() - t_start:.1f}s)")


if __name__ == "__main__":
    main()
