"""diffusers' UNet forward and VAE decode, timed one call at a time on request, for diffloom's model
benchmark (tests/bench/models.rs), which alternates its own calls with these so that both sides are
measured under the same machine conditions (this 2-core machine's speed drifts by ±15% over minutes).

Usage: unet_reference.py CKPT.safetensors
  prints {"threads": N} once loaded, then for each request line on stdin (`unet fp32`, `unet bf16`,
  `vae fp32`, `vae bf16`) one JSON line {"s": seconds} for one timed call; the first request of each
  kind is preceded by an untimed warm-up call. Requests go fp32 before bf16 (the models are converted
  once, never back) and UNet before VAE (the UNet is freed when the VAE's turn comes).

The weights are converted by diffusers' own single-file code (convert_ldm_unet_checkpoint and
convert_ldm_vae_checkpoint) with the SD 1.5 hyper-parameters (runwayml/stable-diffusion-v1-5
unet/config.json, the SD VAE's); inputs are those of the Rust side: UNet batch 2 (cond + uncond), 64×64
latents, 77×768 context; the VAE decodes one 64×64 latent (a 512×512 image), as `VAEDecode` does.
"""
import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def load(path):
    """diffusers' UNet and VAE from the single file, converted by diffusers' own code, in eval mode."""
    sd = load_file(path)
    unet = UNet2DConditionModel.from_config(SD15_UNET)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet.config), strict=True)
    vae = AutoencoderKL.from_config(SD_VAE)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae.config), strict=True)
    return unet.eval(), vae.eval()


def serve(path):
    torch.set_grad_enabled(False)
    unet, vae = load(path)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])
    z = torch.randn(1, 4, 64, 64, generator=g)
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    warm = set()
    for line in sys.stdin:
        part, name = line.split()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        if (part, name) not in warm:
            # Converted once per kind (the first request of it), then warmed up.
            if part == "unet":
                unet = unet.to(dtype)
                xd, ctxd = x.to(dtype), ctx.to(dtype)
                call = lambda: unet(xd, t, encoder_hidden_states=ctxd)  # noqa: E731
            else:
                unet = None
                vae = vae.to(dtype)
                zd = z.to(dtype)
                call = lambda: vae.decode(zd)  # noqa: E731
            call()
            warm.add((part, name))
        start = time.perf_counter()
        call()
        print(json.dumps({"s": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
