#!/usr/bin/env python3
"""Reference outputs of ESRGAN-family upscalers, for diffloom's upscaler parity test.

Usage:  .venv/bin/python tests/parity/upscale_reference.py IN.safetensors OUT.safetensors MODEL.safetensors...

IN holds `image`, a [b, 3, h, w] float32 tensor in 0..1, and `small`, a [1, 3, h, w] one. Each MODEL
file is loaded by spandrel's own ModelLoader (architecture detection and key conversion included; this
script knows nothing about the layout) and run in fp32 on the CPU. OUT receives, for the i-th model:
`out.<i>` the bare network on `image` (unclamped), `call.<i>` spandrel's descriptor call (what ComfyUI
runs per tile: size padding, clamp, crop) on each item of `image`, `small.<i>` the call on `small`,
and `scale.<i>` spandrel's detected scale.
"""
import sys

import torch
from safetensors.torch import load_file, save_file
from spandrel import ImageModelDescriptor, ModelLoader


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    inputs = load_file(sys.argv[1])
    image, small = inputs["image"].float(), inputs["small"].float()
    out = {}
    for i, path in enumerate(sys.argv[3:]):
        desc = ModelLoader(device="cpu").load_from_file(path)
        if not isinstance(desc, ImageModelDescriptor) or desc.architecture.id != "ESRGAN":
            sys.exit(f"upscale_reference.py: {path}: spandrel loaded {desc.architecture.id}, expected ESRGAN")
        model = desc.model.float().eval()
        with torch.no_grad():
            out[f"out.{i}"] = model(image).contiguous()
            out[f"call.{i}"] = torch.cat([desc(image[b:b + 1]) for b in range(image.shape[0])]).contiguous()
            out[f"small.{i}"] = desc(small).contiguous()
        out[f"scale.{i}"] = torch.tensor([desc.scale], dtype=torch.int64)
        print(f"{path}: {desc.architecture.name} x{desc.scale}, output {tuple(out[f'out.{i}'].shape)}")
    save_file(out, sys.argv[2])


if __name__ == "__main__":
    main()
