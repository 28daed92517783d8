"""Tiny CLIP vision models and a tiny T2I style adapter, with what ComfyUI computes from them.

Usage: clip_vision_reference.py OUT_DIR
Writes, CPU float32 and seeded, nothing downloaded (HF_HUB_OFFLINE=1):
- OUT_DIR/clip_vision_quick_gelu/ and OUT_DIR/clip_vision_gelu/: transformers' own
  CLIPVisionModelWithProjection with a tiny CLIPVisionConfig (width 32, 3 layers, 4 heads, 16-pixel
  input in 4-pixel patches, projection 24), every parameter perturbed, `save_pretrained` as
  safetensors (model.safetensors and config.json);
- OUT_DIR/style.safetensors: the state dict of ComfyUI's StyleAdapter (copied below from
  comfy/t2i_adapter/adapter.py) with width 32 (the vision width), context_dim 32 (the tiny SD1 text
  width), 8 heads (ComfyUI's), 2 layers, 3 tokens;
- OUT_DIR/expected.safetensors: input.image_a [2, 20, 28, 3] (resized and cropped), input.image_b
  [1, 16, 16, 4] (the model's size, RGBA); pre.{a,b}.{center,none} = ComfyUI's clip_preprocess (copied
  below from comfy/clip_model.py); and for each activation ACT, on pre.a.center:
  ACT.image_embeds, ACT.last_hidden_state, ACT.penultimate (hidden_states[-2], what ComfyUI's
  intermediate_output=-2 gives) and ACT.style (the StyleAdapter on last_hidden_state).
"""

import os
import sys
from collections import OrderedDict

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)


# comfy/clip_model.py
def clip_preprocess(image, size=224, mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711], crop=True):
    image = image[:, :, :, :3] if image.shape[3] > 3 else image
    mean = torch.tensor(mean, device=image.device, dtype=image.dtype)
    std = torch.tensor(std, device=image.device, dtype=image.dtype)
    image = image.movedim(-1, 1)
    if not (image.shape[2] == size and image.shape[3] == size):
        if crop:
            scale = (size / min(image.shape[2], image.shape[3]))
            scale_size = (round(scale * image.shape[2]), round(scale * image.shape[3]))
        else:
            scale_size = (size, size)

        image = torch.nn.functional.interpolate(image, size=scale_size, mode="bicubic", antialias=True)
        h = (image.shape[2] - size)//2
        w = (image.shape[3] - size)//2
        image = image[:,:,h:h+size,w:w+size]
    image = torch.clip((255. * image), 0, 255).round() / 255.0
    return (image - mean.view([3,1,1])) / std.view([3,1,1])


# comfy/t2i_adapter/adapter.py
class LayerNorm(nn.LayerNorm):
    """Subclass torch's LayerNorm to handle fp16."""

    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):

    def forward(self, x: torch.Tensor):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None):
        super().__init__()

        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                         ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor):
        self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]

    def forward(self, x: torch.Tensor):
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class StyleAdapter(nn.Module):

    def __init__(self, width=1024, context_dim=768, num_head=8, n_layes=3, num_token=4):
        super().__init__()

        scale = width ** -0.5
        self.transformer_layes = nn.Sequential(*[ResidualAttentionBlock(width, num_head) for _ in range(n_layes)])
        self.num_token = num_token
        self.style_embedding = nn.Parameter(torch.randn(1, num_token, width) * scale)
        self.ln_post = LayerNorm(width)
        self.ln_pre = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, context_dim))

    def forward(self, x):
        # x shape [N, HW+1, C]
        style_embedding = self.style_embedding + torch.zeros(
            (x.shape[0], self.num_token, self.style_embedding.shape[-1]), device=x.device)
        x = torch.cat([x, style_embedding], dim=1)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer_layes(x)
        x = x.permute(1, 0, 2)  # LND -> NLD

        x = self.ln_post(x[:, -self.num_token:, :])
        x = x @ self.proj

        return x


def perturb(module):
    # Random layer norms and biases too (transformers initialises them to 1 and 0).
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)


expected = {}
image_a = torch.rand(2, 20, 28, 3)
image_b = torch.rand(1, 16, 16, 4)
expected["input.image_a"], expected["input.image_b"] = image_a, image_b
size = 16
for name, image in [("a", image_a), ("b", image_b)]:
    for crop in ["center", "none"]:
        expected[f"pre.{name}.{crop}"] = clip_preprocess(image, size=size, crop=crop == "center")

style = StyleAdapter(width=32, context_dim=32, num_head=8, n_layes=2, num_token=3).eval()
perturb(style)
save_file({k: v.contiguous() for k, v in style.state_dict().items()}, os.path.join(out, "style.safetensors"))

for act in ["quick_gelu", "gelu"]:
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=size,
                              patch_size=4, projection_dim=24, hidden_act=act)
    model = CLIPVisionModelWithProjection(config).eval()
    perturb(model)
    model.save_pretrained(os.path.join(out, f"clip_vision_{act}"), safe_serialization=True)
    with torch.no_grad():
        o = model(pixel_values=expected["pre.a.center"], output_hidden_states=True)
        expected[f"{act}.image_embeds"] = o.image_embeds
        expected[f"{act}.last_hidden_state"] = o.last_hidden_state
        expected[f"{act}.penultimate"] = o.hidden_states[-2]
        expected[f"{act}.style"] = style(o.last_hidden_state)

save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(out, "expected.safetensors"))
