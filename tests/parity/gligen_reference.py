#!/usr/bin/env python3
"""Reference outputs of GLIGEN (text boxes), computed with diffusers' own GLIGEN modules.

Usage:  .venv/bin/python tests/parity/gligen_reference.py MODELS_DIR OUT_FILE

MODELS_DIR holds `tiny-sd1.safetensors` (with its architecture as JSON under the "diffloom.config"
header key) and `tiny-sd1-gligen.safetensors` (ComfyUI's GLIGEN file layout), as `make-test-models`
writes them. OUT_FILE receives the inputs (`input.*`) and outputs (`out.*`), fp32. Everything runs in
fp32 on the CPU, offline, under torch.no_grad().

Modules (diffusers 0.42.1)
    position net  diffusers.models.embeddings.GLIGENTextBoundingboxProjection(positive_len=in_dim,
                  out_dim=key_dim, feature_type="text-only", fourier_freqs=8)
    fuser         diffusers.models.attention.GatedSelfAttentionDense(query_dim, key_dim, n_heads, d_head)
                  with ComfyUI's head rule (comfy/gligen.py load_gligen): key_dim 768 -> 8 heads of
                  query_dim // 8, else heads of 64 (n_heads = query_dim // 64).
    UNet          UNet2DConditionModel built by diffusers' own single-file code
                  (create_unet_diffusers_config_from_ldm + convert_ldm_unet_checkpoint, as reference.py)
                  with config["attention_type"] = "gated": each BasicTransformerBlock then has a `fuser`
                  run after self-attention's residual (diffusers' "GLIGEN Control"), and the model a
                  `position_net` run on cross_attention_kwargs["gligen"]. diffusers gives each fuser the
                  block's own head count; the fusers are replaced by ones with ComfyUI's rule (the weight
                  shapes are the same, only the head split differs).

Key map (GLIGEN file -> diffusers; every file tensor is used exactly once, loading is strict)
    position_net.{linears.0,linears.2,linears.4}.{weight,bias}, position_net.null_positive_feature,
    position_net.null_position_feature                       -> position_net.<same>
    input_blocks.{1 + i*(nrb+1) + j}.1.transformer_blocks.0.fuser.<rest>
                                                               -> down_blocks.i.attentions.j.transformer_blocks.0.fuser.<rest>
    middle_block.1.transformer_blocks.0.fuser.<rest>          -> mid_block.attentions.0.transformer_blocks.0.fuser.<rest>
    output_blocks.{i*(nrb+1) + j}.1.transformer_blocks.0.fuser.<rest>
                                                               -> up_blocks.i.attentions.j.transformer_blocks.0.fuser.<rest>
    (nrb = num_res_blocks; <rest> = linear, attn.to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, norm1,
    norm2, alpha_attn, alpha_dense: the same names in both.) The script checks that this order is the
    order diffusers' forward meets the transformers, which is ComfyUI's transformer_index order.

Boxes
    The boxes are made by ComfyUI's `Gligen.set_position` (comfy/gligen.py, transcribed below): each
    GLIGENTextBoxApply box (pooled, height // 8, width // 8, y // 8, x // 8) becomes (x1, y1, x2, y2) as
    fractions of the latent, mask 1, padded with zeros to 30 objects and repeated over the batch.

Tensors written
    input.pooled [n, in_dim], input.box [n, 4] (height, width, y, x in latent pixels, int64),
    input.fuser_x, input.latent, input.timesteps, input.context
    out.boxes, out.masks         set_position's boxes and masks for a 2 x 8 x 8 latent
    out.objs                     position net on them [2, 30, key_dim]
    out.fuser                    the fuser of output_blocks.1 on input.fuser_x and out.objs
    out.unet_plain               tiny-sd1 UNet, no GLIGEN
    out.unet_gligen              ... with the GLIGEN grounding tokens (cross_attention_kwargs["gligen"])
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense  # noqa: E402
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import reference  # noqa: E402  (the UNet's own single-file conversion)


def fail(msg):
    sys.exit(f"gligen_reference.py: error: {msg}")


def comfy_heads(query_dim, key_dim):
    """comfy/gligen.py load_gligen."""
    if key_dim == 768:
        return 8, query_dim // 8
    return query_dim // 64, 64


def set_position(latent_shape, position_params, key_dim, max_objs=30):
    """comfy/gligen.py Gligen.set_position, without the model call: boxes, masks, conds."""
    batch, c, h, w = latent_shape
    masks = torch.zeros([max_objs], device="cpu")
    boxes = []
    positive_embeddings = []
    for p in position_params:
        x1 = (p[4]) / w
        y1 = (p[3]) / h
        x2 = (p[4] + p[2]) / w
        y2 = (p[3] + p[1]) / h
        masks[len(boxes)] = 1.0
        boxes += [torch.tensor((x1, y1, x2, y2)).unsqueeze(0)]
        positive_embeddings += [p[0]]
    append_boxes = []
    append_conds = []
    if len(boxes) < max_objs:
        append_boxes = [torch.zeros([max_objs - len(boxes), 4], device="cpu")]
        append_conds = [torch.zeros([max_objs - len(boxes), key_dim], device="cpu")]
    box_out = torch.cat(boxes + append_boxes).unsqueeze(0).repeat(batch, 1, 1)
    masks = masks.unsqueeze(0).repeat(batch, 1)
    conds = torch.cat(positive_embeddings + append_conds).unsqueeze(0).repeat(batch, 1, 1)
    return box_out, masks, conds


def fuser_map(u, gligen_keys):
    """GLIGEN fuser prefix -> diffusers transformer block prefix, in forward order."""
    nrb, levels = u["num_res_blocks"], len(u["channel_mult"])
    out = {}
    for i in range(levels):
        for j in range(nrb):
            out[f"input_blocks.{1 + i * (nrb + 1) + j}.1."] = f"down_blocks.{i}.attentions.{j}."
    out["middle_block.1."] = "mid_block.attentions.0."
    for i in range(levels):
        for j in range(nrb + 1):
            out[f"output_blocks.{i * (nrb + 1) + j}.1."] = f"up_blocks.{i}.attentions.{j}."
    present = {k.split("transformer_blocks.")[0] for k in gligen_keys if ".fuser." in k}
    return {k: v for k, v in out.items() if k in present}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    models, out_path = sys.argv[1:]
    ckpt_path = os.path.join(models, "tiny-sd1.safetensors")
    with safe_open(ckpt_path, "pt") as f:
        cfg = json.loads((f.metadata() or {})["diffloom.config"])
    u = cfg["unet"]
    g = load_file(os.path.join(models, "tiny-sd1-gligen.safetensors"))
    in_dim = g["position_net.null_positive_feature"].shape[0]
    key_dim = g["position_net.linears.4.weight"].shape[0]
    torch.set_grad_enabled(False)

    torch.manual_seed(0)
    n = 3
    pooled = torch.randn(n, in_dim)
    # (height, width, y, x) in latent pixels, as GLIGENTextBoxApply's // 8 leaves them.
    box = torch.tensor([[4, 3, 0, 2], [2, 8, 5, 0], [8, 8, 0, 0]], dtype=torch.int64)
    fuser_x = torch.randn(2, 16, 128)
    latent = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([999.0, 10.0])
    context = torch.randn(2, 77, u["context_dim"])

    params = [(pooled[i:i + 1], *[int(v) for v in box[i]]) for i in range(n)]
    boxes, masks, conds = set_position(tuple(latent.shape), params, key_dim)

    # Position net.
    pn = GLIGENTextBoundingboxProjection(positive_len=in_dim, out_dim=key_dim, feature_type="text-only", fourier_freqs=8)
    pn_sd = {k[len("position_net."):]: t for k, t in g.items() if k.startswith("position_net.")}
    pn.load_state_dict(pn_sd, strict=True)
    pn.eval()
    objs = pn(boxes=boxes, masks=masks, positive_embeddings=conds)

    # One fuser on its own.
    prefix = "output_blocks.1.1.transformer_blocks.0.fuser."
    f_sd = {k[len(prefix):]: t for k, t in g.items() if k.startswith(prefix)}
    query_dim = f_sd["linear.weight"].shape[0]
    if query_dim != fuser_x.shape[2]:
        fail(f"{prefix} is {query_dim} wide, the input {fuser_x.shape[2]}")
    fuser = GatedSelfAttentionDense(query_dim, key_dim, *comfy_heads(query_dim, key_dim))
    fuser.load_state_dict(f_sd, strict=True)
    fuser.eval()
    fuser_out = fuser(fuser_x, objs)

    # The whole UNet, with diffusers' gated attention.
    ckpt = load_file(ckpt_path)
    orig = reference.original_config(cfg)
    plain = reference.build_unet(cfg, orig, ckpt)
    config = sfu.create_unet_diffusers_config_from_ldm(orig, ckpt)
    if config["attention_head_dim"] is None:
        config["attention_head_dim"] = [reference.ldm_heads(u, ch) for ch in config["block_out_channels"]]
    config["attention_type"] = "gated"
    unet = UNet2DConditionModel.from_config(config)
    sd = sfu.convert_ldm_unet_checkpoint(ckpt, config)
    mapping = fuser_map(u, g.keys())
    blocks = [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    # diffusers registers mid_block after up_blocks; its forward runs down, mid, up blocks, as the map.
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    blocks.sort(key=lambda b: rank[b[0].split(".")[0]])
    if [name.split("transformer_blocks")[0] for name, _ in blocks] != list(mapping.values()):
        fail(f"the fusers {list(mapping)} do not match diffusers' transformers {[b for b, _ in blocks]}")
    for name, block in blocks:
        old = block.fuser
        q, k = old.linear.out_features, old.linear.in_features
        if k != key_dim:
            fail(f"{name}: diffusers' fuser takes {k}-wide tokens, the file's {key_dim}")
        block.fuser = GatedSelfAttentionDense(q, k, *comfy_heads(q, k))
    if (unet.position_net.linears[0].in_features, unet.position_net.linears[4].out_features) != (in_dim + 64, key_dim):
        fail("diffusers' position net has other widths than the file's")
    used = set()
    for src, dst in mapping.items():
        for key, t in g.items():
            if key.startswith(src):
                sd[dst + key[len(src):]] = t
                used.add(key)
    for key, t in pn_sd.items():
        sd["position_net." + key] = t
        used.add("position_net." + key)
    if used != set(g.keys()):
        fail(f"GLIGEN tensors not mapped: {sorted(set(g.keys()) - used)[:5]}")
    unet.load_state_dict(sd, strict=True)
    unet = unet.float().eval()

    unet_plain = plain(latent, timesteps, encoder_hidden_states=context).sample
    gligen_args = {"gligen": {"boxes": boxes, "masks": masks, "positive_embeddings": conds}}
    unet_gligen = unet(latent, timesteps, encoder_hidden_states=context, cross_attention_kwargs=gligen_args).sample
    # The gated UNet without GLIGEN input is the plain one.
    unet_gated_plain = unet(latent, timesteps, encoder_hidden_states=context).sample
    if not torch.equal(unet_gated_plain, unet_plain):
        print(f"note: gated UNet without boxes differs from the plain one by {(unet_gated_plain - unet_plain).abs().max():.2e}")

    tensors = {
        "input.pooled": pooled, "input.box": box, "input.fuser_x": fuser_x, "input.latent": latent,
        "input.timesteps": timesteps, "input.context": context,
        "out.boxes": boxes, "out.masks": masks, "out.objs": objs, "out.fuser": fuser_out,
        "out.unet_plain": unet_plain, "out.unet_gligen": unet_gligen,
    }
    for k, t in tensors.items():
        print(f"{k:18s} {str(list(t.shape)):16s} mean|x|={t.float().abs().mean().item():.6f}")
    print(f"GLIGEN moves the UNet output by {(unet_gligen - unet_plain).abs().max().item():.4f}")
    save_file({k: t.contiguous() for k, t in tensors.items()}, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
