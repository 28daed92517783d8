#!/usr/bin/env python3
"""Reference outputs of ControlNet and T2I-Adapter, computed with diffusers' own modules.

Usage:  .venv/bin/python tests/parity/controlnet_reference.py MODELS_DIR OUT_DIR

MODELS_DIR holds the tiny random-weight files written by `make-test-models` (tiny-sd1,
tiny-sd1-controlnet, tiny-sd1-4level, tiny-t2i-adapter, tiny-t2i-adapter-light .safetensors, each
with its architecture as JSON under the "diffloom.config" header key). OUT_DIR receives
`controlnet_expected.safetensors` (inputs `input.*` and outputs, fp32) and `diffusers_controlnet/`
(the converted ControlNet written by diffusers' own save_pretrained). Everything runs in fp32 on the
CPU, offline, under torch.no_grad().

ControlNet (file layout: ControlNet-1.1 single file, `control_model.` prefix)
    Converted by diffusers' own single-file code, no key map of ours:
    `create_controlnet_diffusers_config_from_ldm(original_config, checkpoint)` and
    `convert_controlnet_checkpoint(checkpoint, config)` (diffusers.loaders.single_file_utils), then
    `ControlNetModel(**config).load_state_dict(strict=True)`; every parameter element under
    `control_model.` must reach the converted dict. original_config is an in-memory equivalent of
    cldm_v15.yaml: model.params.{unet_config, control_stage_config (+hint_channels),
    first_stage_config}. Head counts are checked against LDM's rule (diffusers'
    attention_head_dim means "number of heads" here).
    diffusers 0.42.1's create_controlnet_diffusers_config_from_ldm calls
    create_unet_diffusers_config_from_ldm(original_config, image_size=...) without the required
    `checkpoint` argument (TypeError); the script passes it through a thin wrapper and otherwise runs
    diffusers' code unchanged.
    Naming, for reference (diffusers <- original): conv_in <- input_blocks.0.0;
    controlnet_cond_embedding.conv_in <- input_hint_block.0; controlnet_cond_embedding.blocks.{k}
    <- input_hint_block.{2k+2} (k = 0..5); controlnet_cond_embedding.conv_out <- input_hint_block.14;
    controlnet_down_blocks.{i} <- zero_convs.{i}.0; controlnet_mid_block <- middle_block_out.0.

T2I-Adapter (file layout: TencentARC original / ComfyUI comfy/t2i_adapter/adapter.py)
    diffusers has no converter for these, so the script holds this explicit key map
    (nrb = nums_rb; every file tensor must be used exactly once, and load_state_dict is strict):
      full  (Adapter, sk=True, ksize=1, use_conv=False  ==  T2IAdapter(adapter_type="full_adapter",
             in_channels=cin/64, channels, num_res_blocks=nrb)):
        conv_in.{w,b}                       -> adapter.conv_in.{w,b}
        body.{i*nrb+j}.block1.{w,b}         -> adapter.body.{i}.resnets.{j}.block1.{w,b}
        body.{i*nrb+j}.block2.{w,b}         -> adapter.body.{i}.resnets.{j}.block2.{w,b}
        body.{i*nrb}.in_conv.{w,b}          -> adapter.body.{i}.in_conv.{w,b}   (only where width changes)
        (skep / down_opt.op keys, i.e. sk=False or use_conv=True, have no diffusers equivalent: refused)
      light (Adapter_light  ==  T2IAdapter(adapter_type="light_adapter", in_channels=cin/64,
             channels=channels[:-1], num_res_blocks=nrb); diffusers' LightAdapter has len(channels)+1
             blocks, the last one channels[-1] -> channels[-1], so the file's last two widths must match):
        body.{i}.in_conv.{w,b}              -> adapter.body.{i}.in_conv.{w,b}
        body.{i}.body.{j}.block{1,2}.{w,b}  -> adapter.body.{i}.resnets.{j}.block{1,2}.{w,b}
        body.{i}.out_conv.{w,b}             -> adapter.body.{i}.out_conv.{w,b}
    The grey (1-channel) full adapter gets the channel mean of the RGB hint, as ComfyUI does
    (torch.mean(cond_hint, 1, keepdim=True) when channels_in == 1).

Where adapter features enter the UNet
    ComfyUI (openaimodel.apply_control 'input', reversed list popped per input block) adds feature
    k after input block 3k+2 (num_res_blocks 2), i.e. after the last resnet(+attention) of level k,
    before its downsampler, and the sum is also what goes to the skip connection.
    diffusers' UNet2DConditionModel adds `down_intrablock_additional_residuals` at the same place for
    CrossAttnDownBlock2D (inside the block, before the downsampler and before the skip is recorded), but
    for a DownBlock2D it adds `sample += r` after the whole block, i.e. AFTER the downsampler. In SD1/SD2
    the only DownBlock2D is the last level, which has no downsampler (and the in-place += also alters
    the aliased skip tensor), so both agree there. With a DownBlock2D that has a downsampler (e.g.
    attention_resolutions [1] with 4 levels) diffusers adds at the wrong resolution and raises.
    So `unet4.*` are computed with ComfyUI's placement, implemented as forward hooks on the diffusers
    UNet (output of the last attention, or last resnet, of each down block + feature). The hooks are
    first checked against diffusers' own down_intrablock_additional_residuals on a UNet with the same
    config but SD's attention layout (cross-attention on all levels but the last, random weights),
    where the two must agree; diffusers' native call on the 4-level file itself is also tried and, if it
    runs, must agree too.

Tensors written (see the printout for shapes):
    input.x, input.t, input.context, input.hint, input.hint_grey, input.x4, input.context4
    cn.down.0..N, cn.mid            ControlNet residuals at conditioning_scale 1.0
    unet.plain                      tiny-sd1 unet(x, t, context)
    unet.controlled                 ... with down_block_additional_residuals / mid_block_additional_residual
    unet.controlled_half            ... with the ControlNet run at conditioning_scale 0.5 (= strength 0.5)
    t2i.full.0..3, t2i.light.0..3   adapter features (scale 1.0)
    unet4.plain, unet4.adapter_full, unet4.adapter_light   tiny-sd1-4level with the adapter features
"""
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402  (sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE on import)

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

CN_PREFIX = "control_model."


def fail(msg):
    sys.exit(f"controlnet_reference.py: error: {msg}")


def read(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "diffloom.config" not in meta:
        fail(f"{path} has no 'diffloom.config' metadata")
    return json.loads(meta["diffloom.config"]), load_file(path)


# ---------------------------------------------------------------- ControlNet

def controlnet_original_config(cfg):
    """The parts of cldm_v15.yaml that diffusers' config builders read."""
    u = cfg["unet"]
    unet = {k: u[k] for k in ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                              "attention_resolutions", "transformer_depth", "context_dim",
                              "use_linear_in_transformer")}
    if isinstance(unet["transformer_depth"], list) and len(unet["transformer_depth"]) == 1:
        unet["transformer_depth"] = unet["transformer_depth"][0]
    for k in ("num_heads", "num_head_channels"):  # the yamls name only the one in use (see reference.py)
        if u[k] != -1:
            unet[k] = u[k]
    if u.get("adm_in_channels") is not None:
        fail("controlnet: adm_in_channels (SDXL-style class embedding) is not handled by this script")
    control = dict(unet, hint_channels=cfg["hint_channels"])
    # Only used for vae_scale_factor -> sample_size, which the ControlNet config does not keep.
    ddconfig = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 4, "in_channels": 3,
                "out_ch": 3, "double_z": True}
    return {"model": {"params": {
        "control_stage_config": {"params": control},
        "unet_config": {"params": unet},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": ddconfig}},
    }}}


def controlnet_config(orig, ckpt):
    try:
        return sfu.create_controlnet_diffusers_config_from_ldm(orig, ckpt)
    except TypeError as e:
        if "checkpoint" not in str(e):
            raise
    # diffusers 0.42.1 bug: it calls create_unet_diffusers_config_from_ldm(original_config,
    # image_size=...) without `checkpoint`. Supply it; the rest is diffusers' own code.
    print("note: create_controlnet_diffusers_config_from_ldm omits `checkpoint` when it calls "
          "create_unet_diffusers_config_from_ldm (TypeError); passing it through a wrapper")
    inner = sfu.create_unet_diffusers_config_from_ldm

    def with_checkpoint(original_config, checkpoint=None, **kw):
        return inner(original_config, ckpt if checkpoint is None else checkpoint, **kw)

    sfu.create_unet_diffusers_config_from_ldm = with_checkpoint
    try:
        with warnings.catch_warnings():  # it also passes image_size, which is deprecated (sample_size only)
            warnings.filterwarnings("ignore", message=".*image_size.*", category=FutureWarning)
            return sfu.create_controlnet_diffusers_config_from_ldm(orig, ckpt)
    finally:
        sfu.create_unet_diffusers_config_from_ldm = inner


def build_controlnet(cfg, ckpt):
    other = [k for k in ckpt if not k.startswith(CN_PREFIX)]
    if other:
        fail(f"controlnet: tensors outside '{CN_PREFIX}': {other[:3]}")
    u = cfg["unet"]
    config = controlnet_config(controlnet_original_config(cfg), ckpt)
    want = [ref.ldm_heads(u, ch) for ch in config["block_out_channels"]]
    if config["attention_head_dim"] is None:
        ref.warn(f"controlnet: diffusers gives attention_head_dim=None; using LDM per-block heads {want}")
        config["attention_head_dim"] = want
    model = ControlNetModel(**config)
    bad = [(n, m.heads, ref.ldm_heads(u, m.query_dim)) for n, m in model.named_modules()
           if isinstance(m, Attention) and m.heads != ref.ldm_heads(u, m.query_dim)]
    if bad:
        fail(f"controlnet: attention_head_dim={config['attention_head_dim']!r} gives heads unlike LDM: {bad[0]}")
    hint_convs = sorted({int(k.split(".")[2]) for k in ckpt if k.startswith(CN_PREFIX + "input_hint_block.")})
    emb_out = list(model.config.conditioning_embedding_out_channels)
    if hint_convs != list(range(0, 4 * len(emb_out) - 1, 2)):  # conv_in, 2 per level change, conv_out
        fail(f"controlnet: input_hint_block convs {hint_convs} do not fit diffusers' embedding {emb_out}")
    converted = sfu.convert_controlnet_checkpoint(ckpt, config)
    none = [k for k, t in converted.items() if t is None]
    if none:
        fail(f"controlnet: converter looked up missing source keys for {none[:3]}")
    n = ref.check_consumed("controlnet", ckpt, CN_PREFIX, converted)
    print(f"controlnet: {n} tensors, hint_channels={config['conditioning_channels']}, "
          f"attention_head_dim={config['attention_head_dim']}, blocks={config['down_block_types']}, "
          f"cond embedding {emb_out}")
    return ref.load_strict(model, converted)


# ---------------------------------------------------------------- T2I-Adapter

def t2i_key_map(kind, keys, channels, nrb):
    """Original (TencentARC / ComfyUI) key -> diffusers T2IAdapter key; see the module docstring."""
    out = {}
    for k in keys:
        p = k.split(".")
        new = None
        if kind == "full":
            if p[0] == "conv_in":
                new = "adapter." + k
            elif p[0] == "body" and len(p) == 4 and p[2] in ("block1", "block2"):
                i, j = divmod(int(p[1]), nrb)
                new = f"adapter.body.{i}.resnets.{j}.{p[2]}.{p[3]}"
            elif p[0] == "body" and len(p) == 4 and p[2] == "in_conv" and int(p[1]) % nrb == 0:
                new = f"adapter.body.{int(p[1]) // nrb}.in_conv.{p[3]}"
        else:
            if p[0] == "body" and len(p) == 4 and p[2] in ("in_conv", "out_conv"):
                new = f"adapter.body.{p[1]}.{p[2]}.{p[3]}"
            elif p[0] == "body" and len(p) == 6 and p[2] == "body" and p[4] in ("block1", "block2"):
                new = f"adapter.body.{p[1]}.resnets.{p[3]}.{p[4]}.{p[5]}"
        if new is None:
            fail(f"t2i {kind}: key '{k}' has no diffusers equivalent (skep/down_opt need sk=True, use_conv=False)")
        if new in out.values():
            fail(f"t2i {kind}: two file keys map to '{new}'")
        out[k] = new
    return out


def build_adapter(path):
    cfg, sd = read(path)
    kind = "full" if isinstance(cfg["kind"], dict) and "full" in cfg["kind"] else cfg["kind"]
    cin, channels, nrb = cfg["cin"], list(cfg["channels"]), cfg["nums_rb"]
    if cin % 64:
        fail(f"t2i: cin {cin} is not a multiple of 8*8")
    if kind == "full":
        opts = cfg["kind"]["full"]
        if opts.get("ksize") != 1 or opts.get("use_conv"):
            fail(f"t2i full: diffusers' full_adapter is ksize=1, use_conv=False (got {opts})")
        model = T2IAdapter(in_channels=cin // 64, channels=channels, num_res_blocks=nrb, downscale_factor=8,
                           adapter_type="full_adapter")
    elif kind == "light":
        if channels[-1] != channels[-2]:
            fail(f"t2i light: diffusers' LightAdapter needs the last two widths equal, got {channels}")
        model = T2IAdapter(in_channels=cin // 64, channels=channels[:-1], num_res_blocks=nrb, downscale_factor=8,
                           adapter_type="light_adapter")
    else:
        fail(f"t2i: unknown kind {cfg['kind']!r}")
    kmap = t2i_key_map(kind, sd.keys(), channels, nrb)
    converted = {kmap[k]: t for k, t in sd.items()}
    model.load_state_dict(converted, strict=True)  # every diffusers key filled, none unexpected
    if len(converted) != len(sd) or sum(t.numel() for t in converted.values()) != sum(
            p.numel() for p in model.state_dict().values()):
        fail(f"t2i {kind}: not every file tensor was used")
    print(f"t2i {kind}: {len(sd)} tensors, in_channels={cin // 64}, channels={list(model.config.channels)}, "
          f"num_res_blocks={nrb}")
    return kind, model.float().eval()


# ---------------------------------------------------------------- adapter placement

def comfy_adapter_hooks(unet, features):
    """ComfyUI's placement: feature k added to the output of the last attention (or last resnet, for a
    block without attention) of down block k, i.e. before the downsampler; the skip sees the sum."""
    handles = []
    for block, f in zip(unet.down_blocks, features):
        attns = getattr(block, "attentions", None)
        if attns is not None and len(attns) > 0:
            def hook(_m, _inp, out, f=f):
                return (out[0] + f,) + tuple(out[1:]) if isinstance(out, tuple) else out.__class__(out.sample + f)
            handles.append(attns[-1].register_forward_hook(hook))
        else:
            handles.append(block.resnets[-1].register_forward_hook(lambda _m, _inp, out, f=f: out + f))
    return handles


def unet_with_comfy_adapter(unet, x, t, ctx, features):
    if len(features) > len(unet.down_blocks):
        fail("more adapter features than down blocks")
    handles = comfy_adapter_hooks(unet, features)
    try:
        return unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        for h in handles:
            h.remove()


def check_hooks_vs_diffusers(unet4, x, t, ctx, features):
    """On SD's layout (cross-attention on every level but the last) diffusers' own
    down_intrablock_additional_residuals must equal the hook placement."""
    cfg = dict(unet4.config)
    n = len(cfg["down_block_types"])
    cfg["down_block_types"] = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    cfg["up_block_types"] = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    torch.manual_seed(1234)
    sd_layout = UNet2DConditionModel.from_config(cfg).float().eval()
    with torch.no_grad():  # random init is tiny; make the outputs non-trivial
        for p in sd_layout.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    native = sd_layout(x, t, encoder_hidden_states=ctx,
                       down_intrablock_additional_residuals=[f.clone() for f in features]).sample
    hooked = unet_with_comfy_adapter(sd_layout, x, t, ctx, features)
    plain = sd_layout(x, t, encoder_hidden_states=ctx).sample
    err = (native - hooked).abs().max().item()
    eff = (native - plain).abs().max().item()
    print(f"adapter placement, SD layout {cfg['down_block_types']}: diffusers native vs ComfyUI-placement hooks "
          f"max|diff|={err:.3g} (adapter effect {eff:.3g})")
    if err > 1e-5 or eff < 1e-3:
        fail("ComfyUI-placement hooks disagree with diffusers' down_intrablock_additional_residuals on SD's layout")


# ---------------------------------------------------------------- main

def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    models, out_dir = sys.argv[1:]
    t0 = time.time()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")

    cn_cfg, cn_ckpt = read(os.path.join(models, "tiny-sd1-controlnet.safetensors"))
    sd_cfg, sd_ckpt = read(os.path.join(models, "tiny-sd1.safetensors"))
    sd4_cfg, sd4_ckpt = read(os.path.join(models, "tiny-sd1-4level.safetensors"))
    if cn_cfg["unet"]["context_dim"] != sd_cfg["unet"]["context_dim"]:
        fail("controlnet and tiny-sd1 context widths differ")

    # Inputs first (module init consumes the global RNG), from one seeded generator.
    g = torch.Generator().manual_seed(20240611)
    u, u4 = sd_cfg["unet"], sd4_cfg["unet"]
    inputs = {
        "input.x": torch.randn(2, u["in_channels"], 16, 16, generator=g),
        "input.t": torch.tensor([999.0, 500.0]),
        "input.context": torch.randn(2, 77, u["context_dim"], generator=g),
        "input.hint": torch.rand(2, cn_cfg["hint_channels"], 128, 128, generator=g),
        "input.x4": torch.randn(2, u4["in_channels"], 16, 16, generator=g),
        "input.context4": torch.randn(2, 77, u4["context_dim"], generator=g),
    }
    inputs["input.hint_grey"] = torch.mean(inputs["input.hint"], 1, keepdim=True)  # ComfyUI, channels_in == 1
    x, t, ctx, hint = (inputs[k] for k in ("input.x", "input.t", "input.context", "input.hint"))
    x4, ctx4 = inputs["input.x4"], inputs["input.context4"]
    out = {}

    # ControlNet + tiny-sd1
    controlnet = build_controlnet(cn_cfg, cn_ckpt)
    unet = ref.build_unet(sd_cfg, ref.original_config(sd_cfg), sd_ckpt)
    down, mid = controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=1.0,
                           return_dict=False)
    for i, r in enumerate(down):
        out[f"cn.down.{i}"] = r
    out["cn.mid"] = mid
    out["unet.plain"] = unet(x, t, encoder_hidden_states=ctx).sample
    out["unet.controlled"] = unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample
    down_h, mid_h = controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=0.5,
                               return_dict=False)
    if max((a * 0.5 - b).abs().max().item() for a, b in zip(list(down) + [mid], list(down_h) + [mid_h])) > 1e-6:
        fail("conditioning_scale is not a plain multiplier of the residuals")
    out["unet.controlled_half"] = unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down_h,
                                       mid_block_additional_residual=mid_h).sample

    # T2I-Adapters + tiny-sd1-4level
    feats = {}
    for name in ("tiny-t2i-adapter.safetensors", "tiny-t2i-adapter-light.safetensors"):
        kind, adapter = build_adapter(os.path.join(models, name))
        a_in = inputs["input.hint_grey"] if adapter.config.in_channels == 1 else hint
        feats[kind] = adapter(a_in)
        for i, f in enumerate(feats[kind]):
            out[f"t2i.{kind}.{i}"] = f
    unet4 = ref.build_unet(sd4_cfg, ref.original_config(sd4_cfg), sd4_ckpt)
    check_hooks_vs_diffusers(unet4, x4, t, ctx4, feats["full"])
    out["unet4.plain"] = unet4(x4, t, encoder_hidden_states=ctx4).sample
    for kind in ("full", "light"):
        out[f"unet4.adapter_{kind}"] = unet_with_comfy_adapter(unet4, x4, t, ctx4, feats[kind])
    try:
        native = unet4(x4, t, encoder_hidden_states=ctx4,
                       down_intrablock_additional_residuals=[f.clone() for f in feats["full"]]).sample
        err = (native - out["unet4.adapter_full"]).abs().max().item()
        print(f"tiny-sd1-4level: diffusers' native down_intrablock_additional_residuals vs ComfyUI placement "
              f"max|diff|={err:.3g}")
        if err > 1e-5:
            fail("diffusers' native adapter placement differs from ComfyUI's on tiny-sd1-4level")
    except RuntimeError as e:
        print(f"note: tiny-sd1-4level blocks are {unet4.config.down_block_types}; diffusers' native "
              f"down_intrablock_additional_residuals fails there (adds after a DownBlock2D's downsampler): "
              f"{str(e).splitlines()[0]}")

    # Report and save
    for k, v in out.items():
        print(f"{k:22s} {str(list(v.shape)):18s} max|x|={v.abs().max().item():.6f}")
    for a, b in (("unet.controlled", "unet.plain"), ("unet.controlled_half", "unet.plain"),
                 ("unet.controlled", "unet.controlled_half"), ("unet4.adapter_full", "unet4.plain"),
                 ("unet4.adapter_light", "unet4.plain")):
        d = (out[a] - out[b]).abs().max().item()
        print(f"max|{a} - {b}| = {d:.6f}")
        if d < 1e-3:
            fail(f"{a} is practically equal to {b}: the control has no effect")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in {**inputs, **out}.items()}
    path = os.path.join(out_dir, "controlnet_expected.safetensors")
    save_file(tensors, path, metadata={"torch": torch.__version__, "diffusers": diffusers.__version__})
    cn_dir = os.path.join(out_dir, "diffusers_controlnet")
    controlnet.save_pretrained(cn_dir, safe_serialization=True)
    print(f"wrote {path} ({len(tensors)} tensors) and {cn_dir} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
