"""diffusers' UNet forward and VAE decode times on a full-size single-file SD 1.x checkpoint, for
diffloom's model benchmark (tests/bench/models.rs runs this and prints the ratios).

Usage: unet_reference.py CKPT.safetensors REPS
  ->  prints one JSON line {"fp32_s": .., "bf16_s": .., "vae_fp32_s": .., "vae_bf16_s": ..}

The VAE is converted by convert_ldm_vae_checkpoint with the SD VAE's hyper-parameters and decodes one
64×64 latent (a 512×512 image), as `VAEDecode` does.

The weights are converted by diffusers' own single-file code (convert_ldm_unet_checkpoint) with the
SD 1.5 UNet hyper-parameters (runwayml/stable-diffusion-v1-5 unet/config.json); inputs are those of the
Rust side: batch 2 (cond + uncond), 64×64 latents, 77×768 context. Median of REPS after one warm-up.
"""
import json
import os
import statistics
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


def timed_decode(vae, dtype, reps):
    vae = vae.to(dtype)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    vae.decode(z)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        vae.decode(z)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(unet, dtype, reps):
    unet = unet.to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    unet(x, t, encoder_hidden_states=ctx)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        unet(x, t, encoder_hidden_states=ctx)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(path):
    """diffusers' UNet and VAE from the single file, converted by diffusers' own code, in eval mode."""
    sd = load_file(path)
    unet = UNet2DConditionModel.from_config(SD15_UNET)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet.config), strict=True)
    vae = AutoencoderKL.from_config(SD_VAE)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae.config), strict=True)
    return unet.eval(), vae.eval()


def main(path, reps):
    torch.set_grad_enabled(False)
    unet, vae = load(path)
    out = {"threads": torch.get_num_threads(), "fp32_s": timed(unet, torch.float32, reps)}
    out["bf16_s"] = timed(unet, torch.bfloat16, reps)
    del unet
    out["vae_fp32_s"] = timed_decode(vae, torch.float32, reps)
    out["vae_bf16_s"] = timed_decode(vae, torch.bfloat16, reps)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
