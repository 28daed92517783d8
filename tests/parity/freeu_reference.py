"""FreeU and FreeU_V2 (ComfyUI 0.8, comfy_extras/nodes_freelunch.py) on a whole UNet, against diffusers'
FreeU (`UNet2DConditionModel.enable_freeu`), for tests/model_patches.rs.

Usage: freeu_reference.py CKPT OUT.safetensors
CKPT is the tiny four-level SD1 file (model_channels 32, channel_mult 1, 2, 4, 4), loaded into diffusers'
UNet2DConditionModel by diffusers' own single-file conversion, as tests/parity/reference.py does.

Where they agree and where they differ:
- Both patch each up/output block the same way at the same place: before the block concatenates the
  skip, the first half of the backbone's channels is multiplied by b and the skip goes through the same
  Fourier filter (threshold 1, scale s). diffusers' `apply_freeu` is ComfyUI's FreeU (v1) arithmetic;
  diffusers has no FreeU_V2 (its backbone factor (b - 1)·normalised channel mean + 1).
- They choose the blocks differently. diffusers applies (b1, s1) in up_blocks[0] and (b2, s2) in
  up_blocks[1] (the two lowest-resolution stages, FreeU's paper). ComfyUI keys on the backbone's channel
  count: (b1, s1) where it has model_channels·4, (b2, s2) where it has model_channels·2. The first block of a
  stage still sees the previous stage's channels, and SD 1.x's two 1280-wide stages are both ·4, so on
  SD 1.x ComfyUI scales output blocks 0-6 with b1 and 7-9 with b2, diffusers 0-2 and 3-5.
- diffusers turns FreeU off when any factor is 0 (it tests them for truth); ComfyUI applies a 0.
So the checks here run diffusers' UNet with diffusers' own `apply_freeu` (v1), or ComfyUI's V2 body
(transcribed below), called where ComfyUI would call them (by channel count, in every up block), and also
keep diffusers' native selection, which diffloom (following ComfyUI) must differ from.

Inputs (seed 0): input.x [1,4,16,16], input.t [1] = 500, input.context [1,77,context_dim].
Outputs (UNet outputs): freeu.plain; freeu.v1 (b1 1.1, b2 1.2, s1 0.9, s2 0.2, ComfyUI's selection);
freeu.v2 (b1 1.3, b2 1.4, s1 0.9, s2 0.2, ComfyUI's selection); freeu.diffusers_v1 (the v1 factors,
diffusers' own enable_freeu).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402  (sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE on import)

import torch  # noqa: E402
from diffusers.models.unets import unet_2d_blocks  # noqa: E402
from diffusers.utils.torch_utils import apply_freeu, fourier_filter  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def comfy_selection(model_channels, v2):
    """An apply_freeu for diffusers' up blocks that picks the factors as ComfyUI's output_block_patch does."""
    def by_channels(resolution_idx, hidden_states, res_hidden_states, s1, s2, b1, b2):
        stage = {model_channels * 4: 0, model_channels * 2: 1}.get(int(hidden_states.shape[1]))
        if stage is None:
            return hidden_states, res_hidden_states
        if not v2:
            return apply_freeu(stage, hidden_states, res_hidden_states, s1=s1, s2=s2, b1=b1, b2=b2)
        scale = (b1, s1) if stage == 0 else (b2, s2)
        # FreeU_V2.execute's output_block_patch (comfy_extras/nodes_freelunch.py), h = hidden_states.
        h, hsp = hidden_states, res_hidden_states
        hidden_mean = h.mean(1).unsqueeze(1)
        B = hidden_mean.shape[0]
        hidden_max, _ = torch.max(hidden_mean.view(B, -1), dim=-1, keepdim=True)
        hidden_min, _ = torch.min(hidden_mean.view(B, -1), dim=-1, keepdim=True)
        hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)
        h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((scale[0] - 1) * hidden_mean + 1)
        hsp = fourier_filter(hsp, threshold=1, scale=scale[1])
        return h, hsp
    return by_channels


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ckpt_path, out_path = sys.argv[1:3]
    with safe_open(ckpt_path, "pt") as f:
        cfg = json.loads((f.metadata() or {})["diffloom.config"])
    ckpt = load_file(ckpt_path)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    u = cfg["unet"]
    x = torch.randn(1, u["in_channels"], 16, 16)
    t = torch.tensor([500.0])
    context = torch.randn(1, cfg["clip"]["max_position_embeddings"], u["context_dim"])
    unet = ref.build_unet(cfg, ref.original_config(cfg), ckpt)
    run = lambda: unet(x, t, encoder_hidden_states=context).sample  # noqa: E731
    out = {"input.x": x, "input.t": t, "input.context": context, "freeu.plain": run()}
    native = unet_2d_blocks.apply_freeu
    try:
        for name, (b1, b2, s1, s2), v2 in (("v1", (1.1, 1.2, 0.9, 0.2), False), ("v2", (1.3, 1.4, 0.9, 0.2), True)):
            unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
            unet_2d_blocks.apply_freeu = comfy_selection(u["model_channels"], v2)
            out[f"freeu.{name}"] = run()
            unet_2d_blocks.apply_freeu = native
            if name == "v1":
                out["freeu.diffusers_v1"] = run()
            unet.disable_freeu()
    finally:
        unet_2d_blocks.apply_freeu = native
    for k in ("freeu.v1", "freeu.v2", "freeu.diffusers_v1"):
        print(f"{k}: max |out - plain| = {(out[k] - out['freeu.plain']).abs().max():.4f}")
    print(f"ComfyUI's vs diffusers' block selection (v1 factors): {(out['freeu.v1'] - out['freeu.diffusers_v1']).abs().max():.4f}")
    save_file({k: v.contiguous() for k, v in out.items()}, out_path)


if __name__ == "__main__":
    main()
