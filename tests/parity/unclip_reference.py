#!/usr/bin/env python3
"""Reference outputs for SD 2.1 unCLIP, for tests/unclip.rs.

Usage:  .venv/bin/python tests/parity/unclip_reference.py CKPT.safetensors OUT.safetensors

CKPT is the tiny unCLIP checkpoint diffloom's test-model writer makes (LDM keys with
model.diffusion_model.label_emb.0.{0,2}, the OpenCLIP image encoder under embedder.model.visual.,
noise_augmentor.*), its configs in the metadata ("diffloom.config", "diffloom.clip_vision_config").
OUT receives, CPU float32:
- unet.*: diffusers' UNet2DConditionModel built and converted by diffusers' own single-file code
  (reference.py's build_unet, with the yaml's num_classes "sequential" and adm_in_channels, which
  give class_embed_type "projection"), run with class_labels = input.y;
- vision.*: transformers' CLIPVisionModelWithProjection loading the image encoder converted to the
  transformers layout by ComfyUI's convert_to_transformers (transcribed below from
  comfy/clip_vision.py and comfy/utils.py), run on input.pixels: image_embeds, last_hidden_state,
  penultimate (hidden_states[-2]);
- adm.CASE: ComfyUI's unclip_adm (comfy/model_base.py) with its CLIPEmbeddingNoiseAugmentation
  (comfy/ldm/modules/encoders/noise_aug_modules.py, its base class from
  comfy/ldm/modules/diffusionmodules/upscaling.py, the schedule and timestep embedding from
  .../diffusionmodules/util.py), transcribed below, for the cases listed in CASES, with the seed
  SD21UNCLIP.encode_adm passes (the sampler's seed minus 10), on the CPU.
"""
import json
import math
import os
import sys
from functools import partial

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

VISION_PREFIX = "embedder.model.visual."


# --- comfy/utils.py ---
def transformers_convert(sd, prefix_from, prefix_to, number):
    keys_to_replace = {
        "{}positional_embedding": "{}embeddings.position_embedding.weight",
        "{}token_embedding.weight": "{}embeddings.token_embedding.weight",
        "{}ln_final.weight": "{}final_layer_norm.weight",
        "{}ln_final.bias": "{}final_layer_norm.bias",
    }

    for k in keys_to_replace:
        x = k.format(prefix_from)
        if x in sd:
            sd[keys_to_replace[k].format(prefix_to)] = sd.pop(x)

    resblock_to_replace = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }

    for resblock in range(number):
        for x in resblock_to_replace:
            for y in ["weight", "bias"]:
                k = "{}transformer.resblocks.{}.{}.{}".format(prefix_from, resblock, x, y)
                k_to = "{}encoder.layers.{}.{}.{}".format(prefix_to, resblock, resblock_to_replace[x], y)
                if k in sd:
                    sd[k_to] = sd.pop(k)

        for y in ["weight", "bias"]:
            k_from = "{}transformer.resblocks.{}.attn.in_proj_{}".format(prefix_from, resblock, y)
            if k_from in sd:
                weights = sd.pop(k_from)
                shape_from = weights.shape[0] // 3
                for x in range(3):
                    p = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
                    k_to = "{}encoder.layers.{}.{}.{}".format(prefix_to, resblock, p[x], y)
                    sd[k_to] = weights[shape_from*x:shape_from*(x + 1)]

    return sd


# --- comfy/clip_vision.py ---
def convert_to_transformers(sd, prefix):
    sd_k = sd.keys()
    if "{}transformer.resblocks.0.attn.in_proj_weight".format(prefix) in sd_k:
        keys_to_replace = {
            "{}class_embedding".format(prefix): "vision_model.embeddings.class_embedding",
            "{}conv1.weight".format(prefix): "vision_model.embeddings.patch_embedding.weight",
            "{}positional_embedding".format(prefix): "vision_model.embeddings.position_embedding.weight",
            "{}ln_post.bias".format(prefix): "vision_model.post_layernorm.bias",
            "{}ln_post.weight".format(prefix): "vision_model.post_layernorm.weight",
            "{}ln_pre.bias".format(prefix): "vision_model.pre_layrnorm.bias",
            "{}ln_pre.weight".format(prefix): "vision_model.pre_layrnorm.weight",
        }

        for x in keys_to_replace:
            if x in sd_k:
                sd[keys_to_replace[x]] = sd.pop(x)

        if "{}proj".format(prefix) in sd_k:
            sd['visual_projection.weight'] = sd.pop("{}proj".format(prefix)).transpose(0, 1)

        sd = transformers_convert(sd, prefix, "vision_model.", 48)
    else:
        raise ValueError("not an OpenCLIP layout")
    return sd


# --- comfy/ldm/modules/diffusionmodules/util.py ---
def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    if schedule == "squaredcos_cap_v2":  # used for karlo prior
        # return early
        return betas_for_alpha_bar(
            n_timestep,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"schedule '{schedule}' not transcribed.")


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


# --- comfy/ldm/modules/diffusionmodules/openaimodel.py ---
class Timestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


# --- comfy/ldm/modules/diffusionmodules/upscaling.py ---
class AbstractLowScaleModel(nn.Module):
    def __init__(self, noise_schedule_config=None):
        super(AbstractLowScaleModel, self).__init__()
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(self, beta_schedule="linear", timesteps=1000,
                          linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                   cosine_s=cosine_s)
        alphas = 1. - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1., alphas_cumprod[:-1])

        timesteps, = betas.shape
        self.num_timesteps = int(timesteps)
        self.linear_start = linear_start
        self.linear_end = linear_end
        assert alphas_cumprod.shape[0] == self.num_timesteps, 'alphas have to be defined for each timestep'

        to_torch = partial(torch.tensor, dtype=torch.float32)

        self.register_buffer('betas', to_torch(betas))
        self.register_buffer('alphas_cumprod', to_torch(alphas_cumprod))
        self.register_buffer('alphas_cumprod_prev', to_torch(alphas_cumprod_prev))

        # calculations for diffusion q(x_t | x_{t-1}) and others
        self.register_buffer('sqrt_alphas_cumprod', to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer('sqrt_one_minus_alphas_cumprod', to_torch(np.sqrt(1. - alphas_cumprod)))
        self.register_buffer('log_one_minus_alphas_cumprod', to_torch(np.log(1. - alphas_cumprod)))
        self.register_buffer('sqrt_recip_alphas_cumprod', to_torch(np.sqrt(1. / alphas_cumprod)))
        self.register_buffer('sqrt_recipm1_alphas_cumprod', to_torch(np.sqrt(1. / alphas_cumprod - 1)))

    def q_sample(self, x_start, t, noise=None, seed=None):
        if noise is None:
            if seed is None:
                noise = torch.randn_like(x_start)
            else:
                noise = torch.randn(x_start.size(), dtype=x_start.dtype, layout=x_start.layout, generator=torch.manual_seed(seed)).to(x_start.device)
        return (extract_into_tensor(self.sqrt_alphas_cumprod.to(x_start.device), t, x_start.shape) * x_start +
                extract_into_tensor(self.sqrt_one_minus_alphas_cumprod.to(x_start.device), t, x_start.shape) * noise)


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    def __init__(self, noise_schedule_config, max_noise_level=1000, to_cuda=False):
        super().__init__(noise_schedule_config=noise_schedule_config)
        self.max_noise_level = max_noise_level


# --- comfy/ldm/modules/encoders/noise_aug_modules.py ---
class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    def __init__(self, *args, clip_stats_path=None, timestep_dim=256, **kwargs):
        super().__init__(*args, **kwargs)
        if clip_stats_path is None:
            clip_mean, clip_std = torch.zeros(timestep_dim), torch.ones(timestep_dim)
        else:
            clip_mean, clip_std = torch.load(clip_stats_path, map_location="cpu")
        self.register_buffer("data_mean", clip_mean[None, :], persistent=False)
        self.register_buffer("data_std", clip_std[None, :], persistent=False)
        self.time_embed = Timestep(timestep_dim)

    def scale(self, x):
        # re-normalize to centered mean and unit variance
        x = (x - self.data_mean.to(x.device)) * 1. / self.data_std.to(x.device)
        return x

    def unscale(self, x):
        # back to original data stats
        x = (x * self.data_std.to(x.device)) + self.data_mean.to(x.device)
        return x

    def forward(self, x, noise_level=None, seed=None):
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device).long()
        else:
            assert isinstance(noise_level, torch.Tensor)
        x = self.scale(x)
        z = self.q_sample(x, noise_level, seed=seed)
        z = self.unscale(z)
        noise_level = self.time_embed(noise_level)
        return z, noise_level


# --- comfy/model_base.py ---
class Output:  # what unclip_adm reads of a CLIP vision output
    def __init__(self, image_embeds):
        self.image_embeds = image_embeds


def unclip_adm(unclip_conditioning, device, noise_augmentor, noise_augment_merge=0.0, seed=None):
    adm_inputs = []
    weights = []
    noise_aug = []
    for unclip_cond in unclip_conditioning:
        for adm_cond in unclip_cond["clip_vision_output"].image_embeds:
            weight = unclip_cond["strength"]
            noise_augment = unclip_cond["noise_augmentation"]
            noise_level = round((noise_augmentor.max_noise_level - 1) * noise_augment)
            c_adm, noise_level_emb = noise_augmentor(adm_cond.to(device), noise_level=torch.tensor([noise_level], device=device), seed=seed)
            adm_out = torch.cat((c_adm, noise_level_emb), 1) * weight
            weights.append(weight)
            noise_aug.append(noise_augment)
            adm_inputs.append(adm_out)

    if len(noise_aug) > 1:
        adm_out = torch.stack(adm_inputs).sum(0)
        noise_augment = noise_augment_merge
        noise_level = round((noise_augmentor.max_noise_level - 1) * noise_augment)
        c_adm, noise_level_emb = noise_augmentor(adm_out[:, :noise_augmentor.time_embed.dim], noise_level=torch.tensor([noise_level], device=device))
        adm_out = torch.cat((c_adm, noise_level_emb), 1)

    return adm_out


# SD21UNCLIP.encode_adm: unclip_adm(..., kwargs.get("unclip_noise_augment_merge", 0.05), kwargs.get("seed", 0) - 10)
MERGE = 0.05

# name: (sampler seed, [(embeds input, strength, noise_augmentation), ...]); the Rust test runs the same.
CASES = {
    "one": (3, [("a", 1.0, 0.0)]),
    "noised": (123456789, [("a", 0.7, 0.3)]),
    "full_noise": (10, [("a", 2.0, 1.0)]),
    "half_level": (5, [("a", 1.0, 0.5)]),
    "merged": (42, [("a", 1.0, 0.25), ("b", -0.5, 0.6)]),
    "batch": (2**64 - 1, [("b", 1.5, 0.1)]),
}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ckpt_path, out_path = sys.argv[1:]
    with safe_open(ckpt_path, "pt") as f:
        meta = f.metadata() or {}
    cfg = json.loads(meta["diffloom.config"])
    vcfg = json.loads(meta["diffloom.clip_vision_config"])
    ckpt = load_file(ckpt_path)
    torch.set_grad_enabled(False)
    u = cfg["unet"]
    adm = u["adm_in_channels"]
    dim = vcfg["projection_dim"]
    assert adm == 2 * dim, (adm, dim)

    torch.manual_seed(0)
    inputs = {
        "input.latent": torch.randn(2, u["in_channels"], 16, 16),
        "input.timesteps": torch.tensor([999.0, 10.0]),
        "input.context": torch.randn(2, 77, u["context_dim"]),
        "input.y": torch.randn(2, adm),
        "input.pixels": torch.randn(2, 3, vcfg["image_size"], vcfg["image_size"]),
        "input.embeds_a": torch.randn(1, dim),
        "input.embeds_b": torch.randn(2, dim),
    }
    out = {}

    # The UNet with its class embedding, by diffusers' converter.
    orig = reference.original_config(cfg)
    orig["model"]["params"]["unet_config"]["params"]["num_classes"] = "sequential"
    orig["model"]["params"]["unet_config"]["params"]["adm_in_channels"] = adm
    unet = reference.build_unet(cfg, orig, ckpt)
    assert unet.config.class_embed_type == "projection", unet.config.class_embed_type
    out["unet.out"] = unet(inputs["input.latent"], inputs["input.timesteps"], encoder_hidden_states=inputs["input.context"],
                           class_labels=inputs["input.y"]).sample
    out["unet.no_class"] = unet(inputs["input.latent"], inputs["input.timesteps"], encoder_hidden_states=inputs["input.context"],
                                class_labels=torch.zeros(2, adm)).sample

    # The image encoder: ComfyUI's conversion, transformers' model.
    sd = {k: t for k, t in ckpt.items() if k.startswith(VISION_PREFIX)}
    converted = convert_to_transformers(dict(sd), VISION_PREFIX)
    left = [k for k in converted if k.startswith(VISION_PREFIX)]
    assert not left, left
    config = CLIPVisionConfig(hidden_size=vcfg["hidden_size"], intermediate_size=vcfg["intermediate_size"],
                              num_hidden_layers=vcfg["num_hidden_layers"], num_attention_heads=vcfg["num_attention_heads"],
                              patch_size=vcfg["patch_size"], image_size=vcfg["image_size"], projection_dim=dim,
                              hidden_act=vcfg["hidden_act"], layer_norm_eps=1e-5, attn_implementation="eager")
    vision = CLIPVisionModelWithProjection(config)
    missing, unexpected = vision.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)
    vision = vision.float().eval()
    v = vision(pixel_values=inputs["input.pixels"], output_hidden_states=True)
    out["vision.image_embeds"] = v.image_embeds
    out["vision.last_hidden_state"] = v.last_hidden_state
    out["vision.penultimate"] = v.hidden_states[-2]
    print(f"vision: {len(sd)} tensors converted, {config.num_hidden_layers} layers, act {config.hidden_act}")

    # The ADM vectors. ComfyUI never loads noise_augmentor.* from the file (non-persistent buffers,
    # and only the UNet's keys are loaded), so the augmentor is the constructor's.
    if torch.all(ckpt["noise_augmentor.data_mean"] == 0):
        sys.exit("the test checkpoint's noise_augmentor.data_mean should be random, to show it is ignored")
    aug = CLIPEmbeddingNoiseAugmentation(noise_schedule_config={"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}, timestep_dim=dim)
    for name, (seed, entries) in CASES.items():
        conds = [{"clip_vision_output": Output(inputs[f"input.embeds_{e}"]), "strength": s, "noise_augmentation": n} for e, s, n in entries]
        y = unclip_adm(conds, "cpu", aug, MERGE, seed - 10)
        out[f"adm.{name}"] = y
        print(f"adm.{name}: seed {seed} - 10, {list(y.shape)}, mean|y| {y.abs().mean().item():.6f}")

    tensors = {k: t.float().contiguous() for k, t in {**inputs, **out}.items()}
    save_file(tensors, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
