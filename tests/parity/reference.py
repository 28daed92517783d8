#!/usr/bin/env python3
"""Reference outputs of the Stable Diffusion model parts, for diffloom's parity tests.

Usage:  .venv/bin/python tests/parity/reference.py CKPT.safetensors OUT.safetensors [--save-diffusers DIR]

CKPT is a single-file checkpoint in the original LDM/CompVis key layout whose safetensors header
carries the architecture as JSON under "diffloom.config". The weights are converted to diffusers /
transformers modules by diffusers' OWN single-file conversion code (diffusers.loaders.
single_file_utils); this script holds no key mapping of its own, so the Rust loader is checked
against an independent implementation. It only supplies the hyper-parameters, as an in-memory
equivalent of the original LDM yaml, and loads strictly.

OUT receives the inputs (input.*) and the outputs (out.*); see tests/parity/README.md.
With --save-diffusers, the converted models are also written as a diffusers folder by diffusers' and
transformers' own save_pretrained, for the parity test of diffloom's diffusers-folder loading.
Everything runs in fp32 on the CPU, offline.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub: configs are built here
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
HF_CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."


def fail(msg):
    sys.exit(f"reference.py: error: {msg}")


def warn(msg):
    print(f"WARNING: {msg}")


def original_config(cfg):
    """The parts of v1-inference.yaml / v2-inference.yaml that diffusers' config builders read."""
    u, v = cfg["unet"], cfg["vae"]
    unet = {k: u[k] for k in ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                              "attention_resolutions", "transformer_depth", "context_dim",
                              "use_linear_in_transformer")}
    # diffloom writes one depth for every level as a one-element list; the yamls write a number.
    if isinstance(unet["transformer_depth"], list) and len(unet["transformer_depth"]) == 1:
        unet["transformer_depth"] = unet["transformer_depth"][0]
    # The real yamls name only the head parameter in use (v1: num_heads, v2: num_head_channels) and
    # create_unet_diffusers_config_from_ldm keys off the *presence* of num_heads, so never pass -1.
    for k in ("num_heads", "num_head_channels"):
        if u[k] != -1:
            unet[k] = u[k]
    ddconfig = {k: v[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch")}
    ddconfig["double_z"] = True
    return {"model": {"params": {
        "scale_factor": 0.18215,
        "unet_config": {"params": unet},
        "first_stage_config": {"params": {"embed_dim": v["embed_dim"], "ddconfig": ddconfig}},
    }}}


def check_consumed(name, ckpt, prefix, converted, ignorable=()):
    """Conversion may silently skip source keys; require every parameter element under `prefix`
    (except the named, known-unused ones) to reach the converted state dict."""
    src = {k: t for k, t in ckpt.items() if k.startswith(prefix)}
    if not src:
        fail(f"{name}: no tensors under '{prefix}'")
    dropped = [k for k in src if k[len(prefix):] in ignorable]
    n_src = sum(t.numel() for k, t in src.items() if k not in dropped)
    n_dst = sum(t.numel() for t in converted.values())
    if n_src != n_dst:
        fail(f"{name}: conversion consumed {n_dst} of {n_src} parameter elements under '{prefix}'")
    for k in dropped:
        warn(f"{name}: '{k}' is not used by the converted model (not needed for SD conditioning)")
    return len(src)


def load_strict(model, sd):
    model.load_state_dict(sd, strict=True)  # raises, listing missing/unexpected keys
    return model.float().eval()


def ldm_heads(u, ch):
    """LDM openaimodel semantics (legacy=False): fixed num_heads, or ch // num_head_channels."""
    return u["num_heads"] if u["num_head_channels"] == -1 else ch // u["num_head_channels"]


def build_unet(cfg, orig, ckpt):
    u = cfg["unet"]
    config = sfu.create_unet_diffusers_config_from_ldm(orig, ckpt)
    # Head counts are invisible in the weights' shapes, so check them against LDM semantics.
    # Known gap: diffusers derives per-block heads from num_head_channels only when
    # use_linear_in_transformer is true; otherwise attention_head_dim stays None (unbuildable).
    # (diffusers' attention_head_dim here means "number of heads", as num_attention_heads is unset.)
    want = [ldm_heads(u, ch) for ch in config["block_out_channels"]]
    if config["attention_head_dim"] is None:
        warn(f"unet: diffusers gives attention_head_dim=None for num_head_channels without "
             f"use_linear_in_transformer; using LDM per-block heads {want}")
        config["attention_head_dim"] = want
    unet = UNet2DConditionModel.from_config(config)
    bad = [(n, m.heads, ldm_heads(u, m.query_dim)) for n, m in unet.named_modules()
           if isinstance(m, Attention) and m.heads != ldm_heads(u, m.query_dim)]
    if bad:
        fail(f"unet: attention_head_dim={config['attention_head_dim']!r} gives heads unlike LDM: {bad[0]}")
    converted = sfu.convert_ldm_unet_checkpoint(ckpt, config)
    n = check_consumed("unet", ckpt, UNET_PREFIX, converted)
    print(f"unet: {n} tensors, attention_head_dim={config['attention_head_dim']}, "
          f"use_linear_projection={config['use_linear_projection']}, blocks={config['down_block_types']}")
    return load_strict(unet, converted)


def build_vae(orig, ckpt):
    config = sfu.create_vae_diffusers_config_from_ldm(orig, ckpt)
    converted = sfu.convert_ldm_vae_checkpoint(ckpt, config)
    n = check_consumed("vae", ckpt, VAE_PREFIX, converted)
    print(f"vae: {n} tensors, block_out_channels={config['block_out_channels']}")
    return load_strict(AutoencoderKL.from_config(config), converted)


def build_clip(cfg, ckpt):
    c = cfg["clip"]
    config = CLIPTextConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
        max_position_embeddings=c["max_position_embeddings"], hidden_act=c["hidden_act"],
        projection_dim=c["projection_dim"], layer_norm_eps=1e-5,  # both OpenAI CLIP and OpenCLIP use 1e-5
        bos_token_id=c["vocab_size"] - 2, eos_token_id=c["vocab_size"] - 1,
        attn_implementation="eager")  # plain softmax(QK^T)V reference math
    model = CLIPTextModel(config)
    if c["layout"] == "hf":
        converted = sfu.convert_ldm_clip_checkpoint(ckpt)
        # transformers keeps position_ids as a non-persistent buffer; older checkpoints still store
        # it and some merges corrupted it, which HF (and we) ignore -- say so if it is not arange.
        pos = converted.pop("text_model.embeddings.position_ids", None)
        if pos is not None and not torch.equal(pos.flatten().round().long(), torch.arange(pos.numel())):
            warn("clip: checkpoint position_ids is not arange(); it is ignored (positions are always 0..76)")
        n = check_consumed("clip", ckpt, HF_CLIP_PREFIX, converted, ignorable=("text_model.embeddings.position_ids",))
    elif c["layout"] == "open_clip":
        # Splits attn.in_proj_{weight,bias} into q/k/v by rows; drops text_projection (only used for
        # pooled embeddings) and, for 24-layer OpenCLIP-H, resblocks.23 (SD2 uses the penultimate
        # layer, so diffusers ships a 23-layer text encoder).
        if f"{OPEN_CLIP_PREFIX}transformer.resblocks.23.attn.in_proj_weight" in ckpt:
            fail("clip: diffusers' OpenCLIP converter always drops resblocks.23; use num_layers < 24")
        converted = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=OPEN_CLIP_PREFIX)
        n = check_consumed("clip", ckpt, OPEN_CLIP_PREFIX, converted, ignorable=("text_projection", "logit_scale"))
        if c["hidden_act"] != "gelu":
            warn(f"clip: OpenCLIP uses exact (erf) GELU, config says hidden_act={c['hidden_act']!r}")
    else:
        fail(f"unknown clip layout {c['layout']!r}")
    # Same step as diffusers' create_diffusers_clip_model_from_ldm: transformers >= 5.6 flattened
    # CLIPTextModel (no `text_model.` submodule), the converters still emit that prefix.
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): t for k, t in converted.items()}
    print(f"clip: {n} tensors, layout={c['layout']}, act={config.hidden_act}, layers={config.num_hidden_layers}, "
          "mask=causal only (no padding mask), as in SD")
    return load_strict(model, converted)


def make_inputs(cfg):
    """Deterministic inputs; generated before any module is built (module init consumes the RNG)."""
    u, v, c = cfg["unet"], cfg["vae"], cfg["clip"]
    torch.manual_seed(0)
    bos, eos, n_pos = c["vocab_size"] - 2, c["vocab_size"] - 1, c["max_position_embeddings"]
    tokens = torch.full((2, n_pos), eos, dtype=torch.int64)
    for row, n_words in enumerate((5, 11)):
        tokens[row, 0] = bos
        tokens[row, 1:1 + n_words] = torch.randint(0, c["vocab_size"] - 2, (n_words,))
    return {
        "input.latent": torch.randn(2, u["in_channels"], 16, 16),
        "input.timesteps": torch.tensor([999.0, 10.0]),
        "input.context": torch.randn(2, n_pos, u["context_dim"]),
        "input.tokens": tokens,
        "input.image": torch.rand(1, v["in_channels"], 32, 32) * 2 - 1,
        "input.z": torch.randn(1, v["z_channels"], 4, 4),  # raw latent, no 0.18215 scaling
    }


def main():
    args = sys.argv[1:]
    save_dir = None
    if "--save-diffusers" in args:
        i = args.index("--save-diffusers")
        save_dir = args[i + 1]
        del args[i:i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    ckpt_path, out_path = args
    with safe_open(ckpt_path, "pt") as f:
        meta = f.metadata() or {}
    if "diffloom.config" not in meta:
        fail(f"{ckpt_path} has no 'diffloom.config' metadata")
    cfg = json.loads(meta["diffloom.config"])
    ckpt = load_file(ckpt_path)
    print(f"{ckpt_path}: family={cfg['family']} prediction={cfg['prediction']} tensors={len(ckpt)}; "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    known = (UNET_PREFIX, VAE_PREFIX, HF_CLIP_PREFIX, OPEN_CLIP_PREFIX)
    other = [k for k in ckpt if not k.startswith(known)]
    if other:
        print(f"note: {len(other)} tensors outside the model prefixes are ignored (e.g. {other[0]})")

    torch.set_grad_enabled(False)
    inputs = make_inputs(cfg)
    orig = original_config(cfg)
    unet, vae, clip = build_unet(cfg, orig, ckpt), build_vae(orig, ckpt), build_clip(cfg, ckpt)

    out = {"out.unet": unet(inputs["input.latent"], inputs["input.timesteps"],
                            encoder_hidden_states=inputs["input.context"]).sample}
    text = clip(input_ids=inputs["input.tokens"], output_hidden_states=True)
    hs = text.hidden_states  # (embeddings, layer 1, ..., layer N), none with the final LN applied
    if len(hs) != cfg["clip"]["num_layers"] + 1 or not torch.allclose(
            clip.final_layer_norm(hs[-1]), text.last_hidden_state, atol=1e-6):
        fail("clip: hidden_states convention changed in this transformers version")
    out["out.clip_last"] = text.last_hidden_state
    out["out.clip_hidden_m2"] = hs[-2]
    out["out.clip_hidden_m2_ln"] = clip.final_layer_norm(hs[-2])  # SD2 / "clip skip 2" conditioning
    # diffusers pipelines sample the posterior, ComfyUI takes its mean: the mean is deterministic.
    out["out.vae_mean"] = vae.encode(inputs["input.image"]).latent_dist.mean
    out["out.vae_decoded"] = vae.decode(inputs["input.z"]).sample

    tensors = {k: t.contiguous() for k, t in {**inputs, **out}.items()}
    for k, t in tensors.items():
        if k.startswith("out."):
            tensors[k] = t.float().contiguous()
            print(f"{k:22s} {str(list(t.shape)):18s} mean|x|={t.abs().mean().item():.6f}")
    save_file(tensors, out_path, metadata={
        "diffloom.config": json.dumps(cfg), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__})
    print(f"wrote {out_path}")
    if save_dir:
        unet.save_pretrained(os.path.join(save_dir, "unet"), safe_serialization=True)
        vae.save_pretrained(os.path.join(save_dir, "vae"), safe_serialization=True)
        clip.save_pretrained(os.path.join(save_dir, "text_encoder"), safe_serialization=True)
        with open(os.path.join(save_dir, "model_index.json"), "w") as f:
            json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}, f)
        print(f"wrote the diffusers folder {save_dir}")


if __name__ == "__main__":
    main()
