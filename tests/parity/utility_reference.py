"""ComfyUI 0.8's utility nodes whose maths is not trivial, for diffloom's ports (tests/utility_nodes.rs).

Usage: utility_reference.py OUT_DIR
       utility_reference.py --latents OUT_DIR DIFFLOOM_LATENT
Writes OUT_DIR/utility_expected.safetensors (float32, CPU, deterministic, no network):
  input.image                          [2, 37, 53, 3] uniform noise (generator seed 7)
  add_noise.<seed>.<strength>          ImageAddNoise (comfy_extras/nodes_images.py) on input.image
  total_pixels.<method>.<mp>.<steps>   ImageScaleToTotalPixels (comfy_extras/nodes_post_processing.py)
  interp.<b1|b4>.s1/.s2, interp.<b>.<ratio>
                                       LatentInterpolate (comfy_extras/nodes_latent.py): latents of batch 1 and
                                       of batch 4 (= the channel count: ComfyUI's broadcasting quirk), with
                                       exact zero pixels (0/0 -> nan_to_num)
  blur.<r>.<sigma>, sharpen.<r>.<sigma>.<alpha>
                                       ImageBlur / ImageSharpen (comfy_extras/nodes_post_processing.py), CPU
  input.smooth                         [2, 37, 53, 3] smooth image for the lanczos cases
  resize_pad.<w>.<h>.<color>.<method>  ResizeAndPadImage (comfy_extras/nodes_images.py) on input.image (lanczos: input.smooth)
  max_dim.<method>.<size>.<which>      ImageScaleToMaxDimension on input.image/input.smooth (wide) or its transpose (tall)
  stitch.<direction>.<match>.<spacing>.<color>
                                       ImageStitch on stitch.image1 [2, 12, 16, 3] and stitch.image2 [1, 9, 10, 4] (smooth);
                                       match_image_size=True goes through PIL's lanczos (8-bit), as ComfyUI
  porter_duff.<mode>, porter_duff_mask.<mode>
                                       PorterDuffImageComposite (comfy_extras/nodes_compositing.py) on
                                       pd.source/pd.source_alpha/pd.destination/pd.destination_alpha
With --latents: .latent files as ComfyUI's SaveLatent writes them (nodes.py; comfy.utils.save_torch_file is
safetensors.torch.save_file), and what ComfyUI's LoadLatent makes of them and of diffloom's DIFFLOOM_LATENT:
  OUT_DIR/comfy.latent                 latent_tensor [2, 4, 5, 7] + latent_format_version_0, prompt/workflow metadata
  OUT_DIR/old.latent                   old format: latent_tensor only (fp16, stored times 0.18215)
  OUT_DIR/latent_expected.safetensors  loaded.comfy, loaded.old, loaded.diffloom (LoadLatent's samples)
and checks that DIFFLOOM_LATENT has ComfyUI's keys, dtype and metadata.
Numbers in keys are written with Python's repr. Node bodies are copied from ComfyUI, device moves dropped;
comfy.utils.common_upscale is inlined for the methods used (torch's interpolate, and PIL for lanczos).
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def common_upscale(samples, width, height, upscale_method, crop):
    # comfy/utils.py, for 4-D samples
    if crop == "center":
        old_width = samples.shape[-1]
        old_height = samples.shape[-2]
        old_aspect = old_width / old_height
        new_aspect = width / height
        x = 0
        y = 0
        if old_aspect > new_aspect:
            x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
        s = samples.narrow(-2, y, old_height - y * 2).narrow(-1, x, old_width - x * 2)
    else:
        s = samples
    if upscale_method == "lanczos":
        return lanczos(s, width, height)
    return F.interpolate(s, size=(height, width), mode=upscale_method)


def smooth_image(b, h, w, c):
    y = torch.linspace(0, 1, h).view(1, h, 1, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w, 1)
    k = torch.arange(1, b * c + 1, dtype=torch.float32).view(b, 1, 1, c)
    return (0.5 + 0.35 * torch.sin(2.0 * x * k + 3.0 * y) * torch.cos(1.5 * y * k - x)).contiguous()


def lanczos(samples, width, height):
    # comfy/utils.py
    images = [Image.fromarray(np.clip(255. * image.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8)) for image in samples]
    images = [image.resize((width, height), resample=Image.Resampling.LANCZOS) for image in images]
    images = [torch.from_numpy(np.array(image).astype(np.float32) / 255.0).movedim(-1, 0) for image in images]
    result = torch.stack(images)
    return result.to(samples.device, samples.dtype)


def resize_and_pad(image, target_width, target_height, padding_color, interpolation):
    # comfy_extras/nodes_images.py ResizeAndPadImage.execute
    batch_size, orig_height, orig_width, channels = image.shape
    scale_w = target_width / orig_width
    scale_h = target_height / orig_height
    scale = min(scale_w, scale_h)
    new_width = int(orig_width * scale)
    new_height = int(orig_height * scale)
    image_permuted = image.permute(0, 3, 1, 2)
    resized = common_upscale(image_permuted, new_width, new_height, interpolation, "disabled")
    pad_value = 0.0 if padding_color == "black" else 1.0
    padded = torch.full((batch_size, channels, target_height, target_width), pad_value, dtype=image.dtype, device=image.device)
    y_offset = (target_height - new_height) // 2
    x_offset = (target_width - new_width) // 2
    padded[:, :, y_offset:y_offset + new_height, x_offset:x_offset + new_width] = resized
    return padded.permute(0, 2, 3, 1)


def scale_to_max_dimension(image, upscale_method, largest_size):
    # comfy_extras/nodes_images.py ImageScaleToMaxDimension.execute
    height = image.shape[1]
    width = image.shape[2]
    if height > width:
        width = round((width / height) * largest_size)
        height = largest_size
    elif width > height:
        height = round((height / width) * largest_size)
        width = largest_size
    else:
        height = largest_size
        width = largest_size
    samples = image.movedim(-1, 1)
    s = common_upscale(samples, width, height, upscale_method, "disabled")
    return s.movedim(1, -1)


def stitch(image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
    # comfy_extras/nodes_images.py ImageStitch.execute
    if image2 is None:
        return image1
    if image1.shape[0] != image2.shape[0]:
        max_batch = max(image1.shape[0], image2.shape[0])
        if image1.shape[0] < max_batch:
            image1 = torch.cat([image1, image1[-1:].repeat(max_batch - image1.shape[0], 1, 1, 1)])
        if image2.shape[0] < max_batch:
            image2 = torch.cat([image2, image2[-1:].repeat(max_batch - image2.shape[0], 1, 1, 1)])
    if match_image_size:
        h1, w1 = image1.shape[1:3]
        h2, w2 = image2.shape[1:3]
        aspect_ratio = w2 / h2
        if direction in ["left", "right"]:
            target_h, target_w = h1, int(h1 * aspect_ratio)
        else:
            target_w, target_h = w1, int(w1 / aspect_ratio)
        image2 = common_upscale(image2.movedim(-1, 1), target_w, target_h, "lanczos", "disabled").movedim(1, -1)
    color_map = {"white": 1.0, "black": 0.0, "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
    color_val = color_map[spacing_color]
    if not match_image_size:
        h1, w1 = image1.shape[1:3]
        h2, w2 = image2.shape[1:3]
        pad_value = 0.0
        if not isinstance(color_val, tuple):
            pad_value = color_val
        if direction in ["left", "right"]:
            if h1 != h2:
                target_h = max(h1, h2)
                if h1 < target_h:
                    pad_h = target_h - h1
                    pad_top, pad_bottom = pad_h // 2, pad_h - pad_h // 2
                    image1 = torch.nn.functional.pad(image1, (0, 0, 0, 0, pad_top, pad_bottom), mode='constant', value=pad_value)
                if h2 < target_h:
                    pad_h = target_h - h2
                    pad_top, pad_bottom = pad_h // 2, pad_h - pad_h // 2
                    image2 = torch.nn.functional.pad(image2, (0, 0, 0, 0, pad_top, pad_bottom), mode='constant', value=pad_value)
        else:
            if w1 != w2:
                target_w = max(w1, w2)
                if w1 < target_w:
                    pad_w = target_w - w1
                    pad_left, pad_right = pad_w // 2, pad_w - pad_w // 2
                    image1 = torch.nn.functional.pad(image1, (0, 0, pad_left, pad_right), mode='constant', value=pad_value)
                if w2 < target_w:
                    pad_w = target_w - w2
                    pad_left, pad_right = pad_w // 2, pad_w - pad_w // 2
                    image2 = torch.nn.functional.pad(image2, (0, 0, pad_left, pad_right), mode='constant', value=pad_value)
    if image1.shape[-1] != image2.shape[-1]:
        max_channels = max(image1.shape[-1], image2.shape[-1])
        if image1.shape[-1] < max_channels:
            image1 = torch.cat([image1, torch.ones(*image1.shape[:-1], max_channels - image1.shape[-1], device=image1.device)], dim=-1)
        if image2.shape[-1] < max_channels:
            image2 = torch.cat([image2, torch.ones(*image2.shape[:-1], max_channels - image2.shape[-1], device=image2.device)], dim=-1)
    if spacing_width > 0:
        spacing_width = spacing_width + (spacing_width % 2)
        if direction in ["left", "right"]:
            spacing_shape = (image1.shape[0], max(image1.shape[1], image2.shape[1]), spacing_width, image1.shape[-1])
        else:
            spacing_shape = (image1.shape[0], spacing_width, max(image1.shape[2], image2.shape[2]), image1.shape[-1])
        spacing = torch.full(spacing_shape, 0.0, device=image1.device)
        if isinstance(color_val, tuple):
            for i, c in enumerate(color_val):
                if i < spacing.shape[-1]:
                    spacing[..., i] = c
            if spacing.shape[-1] == 4:
                spacing[..., 3] = 1.0
        else:
            spacing[..., : min(3, spacing.shape[-1])] = color_val
            if spacing.shape[-1] == 4:
                spacing[..., 3] = 1.0
    images = [image2, image1] if direction in ["left", "up"] else [image1, image2]
    if spacing_width > 0:
        images.insert(1, spacing)
    concat_dim = 2 if direction in ["left", "right"] else 1
    return torch.cat(images, dim=concat_dim)


RESIZE_PAD = [(64, 64, "white", "area"), (30, 50, "black", "bicubic"), (100, 20, "white", "nearest-exact"), (53, 37, "black", "bilinear"),
              (40, 40, "white", "lanczos"), (1, 100, "black", "area")]
MAX_DIM = [("area", 20), ("bilinear", 71), ("nearest-exact", 13), ("bicubic", 100), ("lanczos", 30)]
STITCH = [(d, m, sp, c) for d in ["right", "down", "left", "up"] for (m, sp, c) in [(False, 0, "white"), (False, 3, "red"), (False, 4, "black"),
                                                                               (True, 2, "blue"), (True, 0, "white")]]


def add_noise(image, seed, strength):
    generator = torch.manual_seed(seed)
    return torch.clip((image + strength * torch.randn(image.size(), generator=generator, device="cpu").to(image)), min=0.0, max=1.0)


def total_pixels(image, upscale_method, megapixels, resolution_steps):
    samples = image.movedim(-1, 1)
    total = megapixels * 1024 * 1024
    scale_by = math.sqrt(total / (samples.shape[3] * samples.shape[2]))
    width = round(samples.shape[3] * scale_by / resolution_steps) * resolution_steps
    height = round(samples.shape[2] * scale_by / resolution_steps) * resolution_steps
    s = common_upscale(samples, int(width), int(height), upscale_method, "disabled")
    return s.movedim(1, -1)


def interpolate(s1, s2, ratio):
    # shapes equal here, so reshape_latent_to is the identity
    m1 = torch.linalg.vector_norm(s1, dim=(1))
    m2 = torch.linalg.vector_norm(s2, dim=(1))
    s1 = torch.nan_to_num(s1 / m1)
    s2 = torch.nan_to_num(s2 / m2)
    t = (s1 * ratio + s2 * (1.0 - ratio))
    mt = torch.linalg.vector_norm(t, dim=(1))
    st = torch.nan_to_num(t / mt)
    return st * (m1 * ratio + m2 * (1.0 - ratio))


def gaussian_kernel(kernel_size, sigma, device=None):
    x, y = torch.meshgrid(torch.linspace(-1, 1, kernel_size, device=device), torch.linspace(-1, 1, kernel_size, device=device), indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return g / g.sum()


def blur(image, blur_radius, sigma):
    if blur_radius == 0:
        return image
    batch_size, height, width, channels = image.shape
    kernel_size = blur_radius * 2 + 1
    kernel = gaussian_kernel(kernel_size, sigma, device=image.device).repeat(channels, 1, 1).unsqueeze(1)
    image = image.permute(0, 3, 1, 2)
    padded_image = F.pad(image, (blur_radius, blur_radius, blur_radius, blur_radius), 'reflect')
    blurred = F.conv2d(padded_image, kernel, padding=kernel_size // 2, groups=channels)[:, :, blur_radius:-blur_radius, blur_radius:-blur_radius]
    return blurred.permute(0, 2, 3, 1)


def sharpen(image, sharpen_radius, sigma, alpha):
    if sharpen_radius == 0:
        return image
    batch_size, height, width, channels = image.shape
    image = image
    kernel_size = sharpen_radius * 2 + 1
    kernel = gaussian_kernel(kernel_size, sigma, device=image.device) * -(alpha * 10)
    kernel = kernel.to(dtype=image.dtype)
    center = kernel_size // 2
    kernel[center, center] = kernel[center, center] - kernel.sum() + 1.0
    kernel = kernel.repeat(channels, 1, 1).unsqueeze(1)
    tensor_image = image.permute(0, 3, 1, 2)
    tensor_image = F.pad(tensor_image, (sharpen_radius, sharpen_radius, sharpen_radius, sharpen_radius), 'reflect')
    sharpened = F.conv2d(tensor_image, kernel, padding=center, groups=channels)[:, :, sharpen_radius:-sharpen_radius, sharpen_radius:-sharpen_radius]
    sharpened = sharpened.permute(0, 2, 3, 1)
    return torch.clamp(sharpened, 0, 1)


MODES = ["ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN", "MULTIPLY", "OVERLAY",
         "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR"]


def porter_duff_composite(src_image, src_alpha, dst_image, dst_alpha, mode):
    src_alpha = 1 - src_alpha
    dst_alpha = 1 - dst_alpha
    src_image = src_image * src_alpha
    dst_image = dst_image * dst_alpha
    if mode == "ADD":
        out_alpha = torch.clamp(src_alpha + dst_alpha, 0, 1)
        out_image = torch.clamp(src_image + dst_image, 0, 1)
    elif mode == "CLEAR":
        out_alpha = torch.zeros_like(dst_alpha)
        out_image = torch.zeros_like(dst_image)
    elif mode == "DARKEN":
        out_alpha = src_alpha + dst_alpha - src_alpha * dst_alpha
        out_image = (1 - dst_alpha) * src_image + (1 - src_alpha) * dst_image + torch.min(src_image, dst_image)
    elif mode == "DST":
        out_alpha = dst_alpha
        out_image = dst_image
    elif mode == "DST_ATOP":
        out_alpha = src_alpha
        out_image = src_alpha * dst_image + (1 - dst_alpha) * src_image
    elif mode == "DST_IN":
        out_alpha = src_alpha * dst_alpha
        out_image = dst_image * src_alpha
    elif mode == "DST_OUT":
        out_alpha = (1 - src_alpha) * dst_alpha
        out_image = (1 - src_alpha) * dst_image
    elif mode == "DST_OVER":
        out_alpha = dst_alpha + (1 - dst_alpha) * src_alpha
        out_image = dst_image + (1 - dst_alpha) * src_image
    elif mode == "LIGHTEN":
        out_alpha = src_alpha + dst_alpha - src_alpha * dst_alpha
        out_image = (1 - dst_alpha) * src_image + (1 - src_alpha) * dst_image + torch.max(src_image, dst_image)
    elif mode == "MULTIPLY":
        out_alpha = src_alpha * dst_alpha
        out_image = src_image * dst_image
    elif mode == "OVERLAY":
        out_alpha = src_alpha + dst_alpha - src_alpha * dst_alpha
        out_image = torch.where(2 * dst_image < dst_alpha, 2 * src_image * dst_image,
                                src_alpha * dst_alpha - 2 * (dst_alpha - src_image) * (src_alpha - dst_image))
    elif mode == "SCREEN":
        out_alpha = src_alpha + dst_alpha - src_alpha * dst_alpha
        out_image = src_image + dst_image - src_image * dst_image
    elif mode == "SRC":
        out_alpha = src_alpha
        out_image = src_image
    elif mode == "SRC_ATOP":
        out_alpha = dst_alpha
        out_image = dst_alpha * src_image + (1 - src_alpha) * dst_image
    elif mode == "SRC_IN":
        out_alpha = src_alpha * dst_alpha
        out_image = src_image * dst_alpha
    elif mode == "SRC_OUT":
        out_alpha = (1 - dst_alpha) * src_alpha
        out_image = (1 - dst_alpha) * src_image
    elif mode == "SRC_OVER":
        out_alpha = src_alpha + (1 - src_alpha) * dst_alpha
        out_image = src_image + (1 - src_alpha) * dst_image
    elif mode == "XOR":
        out_alpha = (1 - dst_alpha) * src_alpha + (1 - src_alpha) * dst_alpha
        out_image = (1 - dst_alpha) * src_image + (1 - src_alpha) * dst_image
    else:
        return None, None
    # back to non-premultiplied alpha
    out_image = torch.where(out_alpha > 1e-5, out_image / out_alpha, torch.zeros_like(out_image))
    out_image = torch.clamp(out_image, 0, 1)
    # convert alpha to mask
    out_alpha = 1 - out_alpha
    return out_image, out_alpha


def porter_duff(source, source_alpha, destination, destination_alpha, mode):
    batch_size = min(len(source), len(source_alpha), len(destination), len(destination_alpha))
    out_images = []
    out_alphas = []
    for i in range(batch_size):
        src_image = source[i]
        dst_image = destination[i]
        assert src_image.shape[2] == dst_image.shape[2]
        src_alpha = source_alpha[i].unsqueeze(2)
        dst_alpha = destination_alpha[i].unsqueeze(2)
        if dst_alpha.shape[:2] != dst_image.shape[:2]:
            upscale_input = dst_alpha.unsqueeze(0).permute(0, 3, 1, 2)
            upscale_output = common_upscale(upscale_input, dst_image.shape[1], dst_image.shape[0], upscale_method='bicubic', crop='center')
            dst_alpha = upscale_output.permute(0, 2, 3, 1).squeeze(0)
        if src_image.shape != dst_image.shape:
            upscale_input = src_image.unsqueeze(0).permute(0, 3, 1, 2)
            upscale_output = common_upscale(upscale_input, dst_image.shape[1], dst_image.shape[0], upscale_method='bicubic', crop='center')
            src_image = upscale_output.permute(0, 2, 3, 1).squeeze(0)
        if src_alpha.shape != dst_alpha.shape:
            upscale_input = src_alpha.unsqueeze(0).permute(0, 3, 1, 2)
            upscale_output = common_upscale(upscale_input, dst_alpha.shape[1], dst_alpha.shape[0], upscale_method='bicubic', crop='center')
            src_alpha = upscale_output.permute(0, 2, 3, 1).squeeze(0)
        out_image, out_alpha = porter_duff_composite(src_image, src_alpha, dst_image, dst_alpha, mode)
        out_images.append(out_image)
        out_alphas.append(out_alpha.squeeze(2))
    return torch.stack(out_images), torch.stack(out_alphas)


def save_latent(samples, file, prompt, extra_pnginfo):
    # nodes.py SaveLatent.save, from the metadata on (the file name comes from get_save_image_path)
    prompt_info = ""
    if prompt is not None:
        prompt_info = json.dumps(prompt)
    metadata = {"prompt": prompt_info}
    if extra_pnginfo is not None:
        for x in extra_pnginfo:
            metadata[x] = json.dumps(extra_pnginfo[x])
    output = {}
    output["latent_tensor"] = samples["samples"].contiguous()
    output["latent_format_version_0"] = torch.tensor([])
    save_file(output, file, metadata=metadata)


def load_latent(latent_path):
    # nodes.py LoadLatent.load
    latent = load_file(latent_path, device="cpu")
    multiplier = 1.0
    if "latent_format_version_0" not in latent:
        multiplier = 1.0 / 0.18215
    samples = {"samples": latent["latent_tensor"].float() * multiplier}
    return (samples, )


def latents(out_dir, diffloom_latent):
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(11)
    samples = torch.randn(2, 4, 5, 7, generator=g)
    prompt = {"3": {"class_type": "EmptyLatentImage", "inputs": {"width": 56, "height": 40, "batch_size": 2}}}
    workflow = {"nodes": [{"id": 3, "type": "EmptyLatentImage"}], "links": []}
    save_latent({"samples": samples, "noise_mask": torch.ones(1, 40, 56)}, os.path.join(out_dir, "comfy.latent"), prompt, {"workflow": workflow})
    # Before latent_format_version_0, ComfyUI stored VAE-scaled latents.
    old = (torch.randn(1, 4, 3, 3, generator=g) * 0.18215).half()
    save_file({"latent_tensor": old}, os.path.join(out_dir, "old.latent"))
    t = {
        "loaded.comfy": load_latent(os.path.join(out_dir, "comfy.latent"))[0]["samples"],
        "loaded.old": load_latent(os.path.join(out_dir, "old.latent"))[0]["samples"],
        "loaded.diffloom": load_latent(diffloom_latent)[0]["samples"],
    }
    with safe_open(diffloom_latent, "pt") as f:
        keys = sorted(f.keys())
        assert keys == ["latent_format_version_0", "latent_tensor"], keys
        marker = f.get_tensor("latent_format_version_0")
        assert marker.dtype == torch.float32 and marker.shape == (0,), (marker.dtype, marker.shape)
        metadata = f.metadata()
    assert isinstance(json.loads(metadata["prompt"]), dict), metadata
    assert isinstance(json.loads(metadata["workflow"]), dict), metadata
    save_file(t, os.path.join(out_dir, "latent_expected.safetensors"))


def main():
    if sys.argv[1] == "--latents":
        latents(sys.argv[2], sys.argv[3])
        return
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    image = torch.rand(2, 37, 53, 3, generator=g)
    t = {"input.image": image}
    for seed, strength in [(0, 0.5), (123456789, 0.25), (2**64 - 1, 1.0)]:
        t[f"add_noise.{seed}.{strength!r}"] = add_noise(image, seed, strength)
    for method, mp, steps in [("bilinear", 0.01, 1), ("area", 0.002, 8), ("nearest-exact", 0.05, 3), ("bicubic", 0.0123, 64)]:
        t[f"total_pixels.{method}.{mp!r}.{steps}"] = total_pixels(image, method, mp, steps)
    for name, b in [("b1", 1), ("b4", 4)]:
        s1 = torch.randn(b, 4, 5, 6, generator=g)
        s2 = torch.randn(b, 4, 5, 6, generator=g)
        s1[:, :, 0, 0] = 0.0
        s2[:, :, 1, 1] = 0.0
        t[f"interp.{name}.s1"] = s1
        t[f"interp.{name}.s2"] = s2
        for ratio in [0.0, 0.3, 1.0]:
            t[f"interp.{name}.{ratio!r}"] = interpolate(s1, s2, ratio)
    for r, sigma in [(1, 1.0), (3, 0.5), (5, 2.5)]:
        t[f"blur.{r}.{sigma!r}"] = blur(image, r, sigma)
    for r, sigma, alpha in [(1, 1.0, 1.0), (2, 0.3, 0.5), (4, 3.0, 2.0), (1, 1.0, 0.0)]:
        t[f"sharpen.{r}.{sigma!r}.{alpha!r}"] = sharpen(image, r, sigma, alpha)
    # lanczos cases run on smooth images (on noise, PIL's clipped 8-bit intermediate pass differs much more).
    smooth = smooth_image(2, 37, 53, 3)
    t["input.smooth"] = smooth
    for w, h, color, method in RESIZE_PAD:
        src = smooth if method == "lanczos" else image
        t[f"resize_pad.{w}.{h}.{color}.{method}"] = resize_and_pad(src, w, h, color, method)
    for method, size in MAX_DIM:
        src = smooth if method == "lanczos" else image
        t[f"max_dim.{method}.{size}.wide"] = scale_to_max_dimension(src, method, size)
        t[f"max_dim.{method}.{size}.tall"] = scale_to_max_dimension(src.transpose(1, 2).contiguous(), method, size)
    s1 = torch.rand(2, 12, 16, 3, generator=g)
    s2 = smooth_image(1, 9, 10, 4)
    s2[..., 3] = 1.0  # opaque: PIL resizes RGBA premultiplied
    t.update({"stitch.image1": s1, "stitch.image2": s2})
    for d, m, sp, c in STITCH:
        t[f"stitch.{d}.{m}.{sp}.{c}"] = stitch(s1, d, m, sp, c, s2)
    # Porter-Duff: source smaller than the destination (bicubic, centre crop), source alpha another size.
    source = torch.rand(2, 20, 30, 3, generator=g)
    source_alpha = torch.rand(2, 10, 10, generator=g)
    destination = torch.rand(2, 24, 32, 3, generator=g)
    destination_alpha = torch.rand(3, 24, 32, generator=g)
    destination_alpha[:, :4] = 1.0  # fully transparent destination rows: out_alpha 0 in some modes
    t.update({"pd.source": source, "pd.source_alpha": source_alpha, "pd.destination": destination, "pd.destination_alpha": destination_alpha})
    for mode in MODES:
        img, mask = porter_duff(source, source_alpha, destination, destination_alpha, mode)
        t[f"porter_duff.{mode}"] = img
        t[f"porter_duff_mask.{mode}"] = mask
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out_dir, "utility_expected.safetensors"))


if __name__ == "__main__":
    main()
