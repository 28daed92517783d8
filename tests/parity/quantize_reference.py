"""ComfyUI 0.8's ImageQuantize (comfy_extras/nodes_post_processing.py) for diffloom's port (tests/image_codecs.rs).

Usage: quantize_reference.py OUT_DIR
Writes OUT_DIR/quantize_expected.safetensors (float32):
  input.<name>                       the input images [B, H, W, 3]: noise (more than 65536 colours, so Pillow's
                                     hash drops bits), smooth (gradients), few (a handful of colours), small
  <name>.<colors>.<dither>           ImageQuantize's output, the node body copied (Pillow, numpy, torch on the CPU)
"""

import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file


def bayer(im, pal_im, order):
    def normalized_bayer_matrix(n):
        if n == 0:
            return np.zeros((1, 1), "float32")
        else:
            q = 4 ** n
            m = q * normalized_bayer_matrix(n - 1)
            return np.bmat(((m - 1.5, m + 0.5), (m + 1.5, m - 0.5))) / q

    num_colors = len(pal_im.getpalette()) // 3
    spread = 2 * 256 / num_colors
    bayer_n = int(math.log2(order))
    bayer_matrix = torch.from_numpy(spread * normalized_bayer_matrix(bayer_n) + 0.5)

    result = torch.from_numpy(np.array(im).astype(np.float32))
    tw = math.ceil(result.shape[0] / bayer_matrix.shape[0])
    th = math.ceil(result.shape[1] / bayer_matrix.shape[1])
    tiled_matrix = bayer_matrix.tile(tw, th).unsqueeze(-1)
    result.add_(tiled_matrix[:result.shape[0], :result.shape[1]]).clamp_(0, 255)
    result = result.to(dtype=torch.uint8)

    im = Image.fromarray(result.cpu().numpy())
    im = im.quantize(palette=pal_im, dither=Image.Dither.NONE)
    return im


def quantize(image, colors, dither):
    batch_size, height, width, _ = image.shape
    result = torch.zeros_like(image)
    for b in range(batch_size):
        im = Image.fromarray((image[b] * 255).to(torch.uint8).numpy(), mode='RGB')
        pal_im = im.quantize(colors=colors)
        if dither == "none":
            quantized_image = im.quantize(palette=pal_im, dither=Image.Dither.NONE)
        elif dither == "floyd-steinberg":
            quantized_image = im.quantize(palette=pal_im, dither=Image.Dither.FLOYDSTEINBERG)
        elif dither.startswith("bayer"):
            order = int(dither.split('-')[-1])
            quantized_image = bayer(im, pal_im, order)
        quantized_array = torch.tensor(np.array(quantized_image.convert("RGB"))).float() / 255
        result[b] = quantized_array
    return result


def main():
    out = sys.argv[1]
    g = torch.Generator().manual_seed(11)
    y = torch.linspace(0, 1, 83).view(83, 1, 1)
    x = torch.linspace(0, 1, 101).view(1, 101, 1)
    smooth = torch.cat([y * x.expand(83, 101, 1), (1 - y).expand(83, 101, 1), (0.5 + 0.5 * torch.sin(9 * x * y)).expand(83, 101, 1)], -1)
    few = torch.tensor([[0.1, 0.2, 0.9], [0.9, 0.9, 0.1], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.3, 0.6]])[torch.randint(0, 5, (2, 29, 31), generator=g)]
    inputs = {
        "noise": torch.rand(1, 300, 290, 3, generator=g),
        "smooth": torch.stack([smooth, smooth.flip(1)]),
        "few": few,
        "small": torch.rand(1, 5, 7, 3, generator=g),
    }
    tensors = {f"input.{k}": v.contiguous() for k, v in inputs.items()}
    for name, image in inputs.items():
        for colors in (256, 17, 4, 1):
            for dither in ("none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"):
                tensors[f"{name}.{colors}.{dither}"] = quantize(image, colors, dither).contiguous()
    save_file(tensors, os.path.join(out, "quantize_expected.safetensors"))


if __name__ == "__main__":
    main()
