"""diffusers' AutoencoderTiny decoder (TAESD) with random weights, for diffloom's TAESD previews.

Usage: taesd_reference.py OUT_DIR
Writes OUT_DIR/diffusers/diffusion_pytorch_model.safetensors (save_pretrained, diffusers' key layout),
OUT_DIR/taesd_decoder.safetensors (the same decoder under the released file's Sequential keys, N+1),
and OUT_DIR/expected.safetensors with a latent and what the decoder makes of it.
"""

import os
import sys

import torch
from diffusers import AutoencoderTiny
from safetensors.torch import load_file, save_file

out = sys.argv[1]
torch.manual_seed(0)
model = AutoencoderTiny().eval()
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.05)
model.save_pretrained(os.path.join(out, "diffusers"), safe_serialization=True)
sd = load_file(os.path.join(out, "diffusers", "diffusion_pytorch_model.safetensors"))
released = {}
for k, v in sd.items():
    if k.startswith("decoder.layers."):
        n, rest = k[len("decoder.layers."):].split(".", 1)
        released[f"{int(n) + 1}.{rest}"] = v
save_file(released, os.path.join(out, "taesd_decoder.safetensors"))
g = torch.Generator().manual_seed(1)
latent = torch.randn(1, 4, 6, 8, generator=g) * 2
with torch.no_grad():
    image = model.decoder(latent)
save_file({"latent": latent, "image": image.contiguous()}, os.path.join(out, "expected.safetensors"))
