"""diffusers' UNet iterations per second in fp16 on the GPU, for tests/bench/gpu_bench.rs.

Usage: gpu_reference.py CKPT ITERS  ->  one JSON line {"64x1": it/s, "64x2": .., "128x1": .., "128x2": ..}

The full-size SD 1.5 checkpoint converted by diffusers' own single-file code (as unet_reference.py), in
fp16, channels-last, with diffusers' default SDPA attention (flash/efficient kernels on CUDA) and cuDNN
benchmark mode: the fast eager setup diffusers documents.
"""
import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def main(path, iters):
    torch.set_grad_enabled(False)
    torch.backends.cudnn.benchmark = True
    unet = UNet2DConditionModel.from_config(SD15_UNET)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(load_file(path), unet.config), strict=True)
    unet = unet.to("cuda", torch.float16).to(memory_format=torch.channels_last).eval()
    out = {}
    for side, batch in ((64, 1), (64, 2), (128, 1), (128, 2)):
        x = torch.randn(batch, 4, side, side, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        t = torch.full((batch,), 500.0, device="cuda")
        ctx = torch.randn(batch, 77, 768, device="cuda", dtype=torch.float16)
        for _ in range(3):
            unet(x, t, encoder_hidden_states=ctx)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            unet(x, t, encoder_hidden_states=ctx)
        torch.cuda.synchronize()
        out[f"{side}x{batch}"] = iters / (time.perf_counter() - start)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
