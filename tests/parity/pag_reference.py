"""PerturbedAttentionGuidance (ComfyUI 0.8, comfy_extras/nodes_pag.py) against diffusers' PAG, for
tests/model_patches.rs.

Usage: pag_reference.py CKPT OUT.safetensors
CKPT is the tiny SD1 single file (diffloom.config metadata), loaded into diffusers' UNet2DConditionModel by
diffusers' own single-file conversion, as tests/parity/reference.py does. PAG's layers are chosen and its
processors set by diffusers' own PAGMixin (pag_utils.py) with `pag_applied_layers="mid"`: every
self-attention (attn1) of mid_block, with PAGIdentitySelfAttnProcessor2_0 (batch [cond, perturbed]) or
PAGCFGIdentitySelfAttnProcessor2_0 (batch [uncond, cond, perturbed]), the perturbed rows computing
to_out(to_v(x)). ComfyUI's node replaces attn1 of unet block ("middle", 0), i.e. every transformer of the
middle block, by `return v`, the same layer and the same output.

Inputs (seed 0): input.x [1,4,16,16] (noisy latent, std sigma), input.sigma [1] = ComfyUI's SD1 sigma of
training step 500 (float64 scaled-linear schedule, float32 as ComfyUI keeps it), input.cond and
input.uncond [1,77,context_dim]. The UNet sees x / sqrt(sigma^2 + 1) at t = 500 (ComfyUI's eps
model_sampling); denoised = x - sigma * eps.
Outputs:
  pag.cond        the plain conditional denoised prediction
  pag.perturbed   the conditional prediction with the identity self-attention (diffusers' perturbed rows)
  pag.guided.<g>.<s>  diffusers' guided prediction (_apply_perturbed_attention_guidance) as denoised, for
                  guidance_scale g and pag_scale s in (5.0, 3.0), (1.0, 2.5) (no CFG: the 2-chunk path),
                  (7.5, 0.0)
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402  (sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE on import)

import diffusers  # noqa: E402
import json  # noqa: E402
import torch  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from diffusers.pipelines.pag.pag_utils import PAGMixin  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


class Pag(PAGMixin):
    """The PAG parts of StableDiffusionPAGPipeline around a bare UNet."""

    def __init__(self, unet, pag_scale):
        self.unet = unet
        self._pag_scale = pag_scale
        self._pag_adaptive_scale = 0.0
        self.set_pag_applied_layers("mid")


def comfy_sd1_sigma(step):
    # comfy/model_sampling.py ModelSamplingDiscrete._register_schedule with comfy's make_beta_schedule("linear"):
    # betas = linspace(sqrt(0.00085), sqrt(0.012), 1000, float64) ** 2; sigmas kept as float32.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
    return float(sigmas[step])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ckpt_path, out_path = sys.argv[1:3]
    with safe_open(ckpt_path, "pt") as f:
        cfg = json.loads((f.metadata() or {})["diffloom.config"])
    ckpt = load_file(ckpt_path)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    step = 500
    sigma = comfy_sd1_sigma(step)
    u = cfg["unet"]
    n_pos = cfg["clip"]["max_position_embeddings"]
    x = torch.randn(1, u["in_channels"], 16, 16) * sigma
    cond = torch.randn(1, n_pos, u["context_dim"])
    uncond = torch.randn(1, n_pos, u["context_dim"])
    unet = ref.build_unet(cfg, ref.original_config(cfg), ckpt)

    # comfy's calculate_input: x / sqrt(sigma^2 + 1) with the sum in float32.
    x_in = x / float(np.sqrt(np.float32(sigma * sigma + 1.0)))
    t = torch.tensor([float(step)])
    denoised = lambda eps: x - eps * sigma  # noqa: E731

    def run(n, context):
        return unet(torch.cat([x_in] * n), t.repeat(n), encoder_hidden_states=context).sample

    out = {"input.x": x, "input.sigma": torch.tensor([sigma]), "input.cond": cond, "input.uncond": uncond}
    plain = run(2, torch.cat([uncond, cond]))
    out["pag.cond"] = denoised(plain[1:])

    # (a) The perturbed pass: the no-CFG processor on batch [cond, perturbed].
    p = Pag(unet, 3.0)
    p._set_pag_attn_processor(p.pag_applied_layers, do_classifier_free_guidance=False)
    names = [n for n, proc in unet.attn_processors.items() if type(proc).__name__.startswith("PAG")]
    print(f"diffusers {diffusers.__version__}: PAG on {names}")
    if names != ["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]:
        sys.exit(f"pag_reference.py: unexpected PAG layers {names}")
    both = run(2, p._prepare_perturbed_attention_guidance(cond, uncond, False))
    if (both[:1] - plain[1:]).abs().max() > 1e-5:
        sys.exit("pag_reference.py: the unperturbed rows changed under the PAG processor")
    out["pag.perturbed"] = denoised(both[1:])

    # (b) Guided predictions as StableDiffusionPAGPipeline computes them.
    for g, s in ((5.0, 3.0), (1.0, 2.5), (7.5, 0.0)):
        p = Pag(unet, s)
        do_cfg = g > 1.0
        unet.set_attn_processor(AttnProcessor2_0())
        p._set_pag_attn_processor(p.pag_applied_layers, do_classifier_free_guidance=do_cfg)
        context = p._prepare_perturbed_attention_guidance(cond, uncond, do_cfg)
        eps = run(context.shape[0], context)
        guided = p._apply_perturbed_attention_guidance(eps, do_cfg, g, step)
        out[f"pag.guided.{g!r}.{s!r}"] = denoised(guided)
        print(f"g={g} s={s}: batch {context.shape[0]}, |guided - cond| = {(out[f'pag.guided.{g!r}.{s!r}'] - out['pag.cond']).abs().max():.4f}")
    save_file({k: v.contiguous() for k, v in out.items()}, out_path)


if __name__ == "__main__":
    main()
