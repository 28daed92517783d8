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
comfy.utils.common_upscale is inlined for the methods used (no crop, torch's interpolate).
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
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
    return F.interpolate(s, size=(height, width), mode=upscale_method)


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
