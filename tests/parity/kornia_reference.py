"""kornia's Canny and morphology as ComfyUI's `Canny` and `ImageMorphology` nodes call them, for diffloom's ports.

Usage: kornia_reference.py OUT_DIR
Writes OUT_DIR/kornia_expected.safetensors (float32, on the CPU, no network, deterministic).

Inputs are ComfyUI IMAGE tensors [B, H, W, 3] in 0..1:
  input.noise    [2, 37, 53, 3]  item 0 uniform noise, item 1 binary (0/1) noise; odd sizes
  input.shapes   [1, 48, 64, 3]  hard-edged discs/rectangles/line on a flat background (exact ties between
                                 the two pixels across a step, so the NMS tie rule matters), a soft disc and ramps
  input.large    [1, 256, 512, 3] uniform noise; large enough (H*W >= 256*256, B*H*W >= 128*1024) that kornia's
                                 CPU gaussian_blur2d takes its weighted-slices path instead of conv2d (Canny only)
Outputs, all what the node returns (ComfyUI IMAGE [B, H, W, 3]):
  canny.<image>.<low>_<high>     Canny node, for (low, high) in (0.4, 0.8) (the node's defaults), (0.1, 0.3),
                                 (0.05, 0.95), (0.5, 0.5); thresholds written with Python's repr, e.g.
                                 canny.noise.0.05_0.95. Values are exactly 0.0 or 1.0, the 3 channels equal.
  canny_magnitude.<image>        kornia's first output, [B, 1, H, W] (gradient magnitude after non-maximum
                                 suppression, before thresholds): not a node output, a debugging aid for a port.
  morph.<image>.<op>.<k>         ImageMorphology for <image> in noise, shapes; <op> the node's combo values erode,
                                 dilate, open, close, gradient, top_hat, bottom_hat; kernel_size <k> in 1, 3, 4
                                 (1 is below the node's min of 3 but kornia accepts it: the identity for
                                 erode/dilate/open/close).
The node bodies are copied from ComfyUI (comfy_extras/nodes_canny.py, comfy_extras/nodes_morphology.py) with the
device moves dropped: ComfyUI runs them on its torch device (CUDA there, where cuDNN's TF32 convolutions and
kornia's `unfold` morphology engine apply); this reference is the CPU computation.
"""

import os
import sys

import numpy as np
import torch
from kornia.filters import canny
from kornia.morphology import bottom_hat, closing, dilation, erosion, gradient, opening, top_hat
from safetensors.torch import save_file

THRESHOLDS = [(0.4, 0.8), (0.1, 0.3), (0.05, 0.95), (0.5, 0.5)]
OPS = ["erode", "dilate", "open", "close", "gradient", "top_hat", "bottom_hat"]
KERNEL_SIZES = [1, 3, 4]


def canny_node(image, low_threshold, high_threshold):
    # comfy_extras/nodes_canny.py, Canny.execute (device moves dropped)
    output = canny(image.movedim(-1, 1), low_threshold, high_threshold)
    img_out = output[1].repeat(1, 3, 1, 1).movedim(1, -1)
    return img_out, output[0]


def morphology_node(image, operation, kernel_size):
    # comfy_extras/nodes_morphology.py, Morphology.execute (device moves dropped)
    kernel = torch.ones(kernel_size, kernel_size)
    image_k = image.movedim(-1, 1)
    if operation == "erode":
        output = erosion(image_k, kernel)
    elif operation == "dilate":
        output = dilation(image_k, kernel)
    elif operation == "open":
        output = opening(image_k, kernel)
    elif operation == "close":
        output = closing(image_k, kernel)
    elif operation == "gradient":
        output = gradient(image_k, kernel)
    elif operation == "top_hat":
        output = top_hat(image_k, kernel)
    elif operation == "bottom_hat":
        output = bottom_hat(image_k, kernel)
    else:
        raise ValueError(f"Invalid operation {operation}")
    return output.movedim(1, -1)


def noise_images():
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(37, 53, 3, generator=g)
    binary = (torch.rand(37, 53, 3, generator=g) > 0.5).float()
    return torch.stack([uniform, binary])


def shapes_image():
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w, 3), 0.1, dtype=np.float32)
    # a horizontal ramp in the lower band and a vertical one in green on the left
    img[36:, :, :] = (xx[36:, :, None] / (w - 1)).repeat(3, axis=2)
    img[:, :6, 1] = yy[:, :6] / (h - 1)
    # hard-edged white disc
    img[(yy - 18) ** 2 + (xx - 16) ** 2 <= 10**2] = 1.0
    # hard-edged red and mid-grey rectangles
    img[6:20, 34:56] = (1.0, 0.0, 0.0)
    img[24:34, 30:60] = (0.5, 0.5, 0.5)
    # a diagonal line two pixels thick
    for t in range(0, 22):
        img[30 - t, 8 + t : 10 + t] = (0.0, 0.0, 1.0)
    # a soft-edged (anti-aliased) yellow disc on the ramp band
    d = np.sqrt((yy - 41) ** 2 + (xx - 50) ** 2)
    a = np.clip(5.5 - d, 0.0, 1.0)[..., None]
    img = img * (1 - a) + a * np.array([1.0, 1.0, 0.0], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]


def large_image():
    g = torch.Generator().manual_seed(2)
    return torch.rand(1, 256, 512, 3, generator=g)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    images = {"noise": noise_images(), "shapes": shapes_image(), "large": large_image()}
    tensors = {}
    with torch.inference_mode():
        for name, image in images.items():
            tensors[f"input.{name}"] = image.contiguous()
            for low, high in THRESHOLDS:
                edges, magnitude = canny_node(image, low, high)
                tensors[f"canny.{name}.{low!r}_{high!r}"] = edges.contiguous()
                tensors[f"canny_magnitude.{name}"] = magnitude.contiguous()
                per_item = [f"{v:.4f}" for v in edges[..., 0].mean((1, 2)).tolist()]
                print(f"canny.{name}.{low!r}_{high!r}: edge fraction per image {per_item}")
            if name == "large":
                continue
            for op in OPS:
                for k in KERNEL_SIZES:
                    result = morphology_node(image, op, k)
                    tensors[f"morph.{name}.{op}.{k}"] = result.contiguous()
                    changed = (result != image).float().mean().item()
                    print(
                        f"morph.{name}.{op}.{k}: min {result.min().item():.4f} max {result.max().item():.4f} "
                        f"mean {result.mean().item():.4f} changed {changed:.3f}"
                    )
    save_file(tensors, os.path.join(out, "kornia_expected.safetensors"))
    print(f"wrote {len(tensors)} tensors to {os.path.join(out, 'kornia_expected.safetensors')}")


if __name__ == "__main__":
    main()
