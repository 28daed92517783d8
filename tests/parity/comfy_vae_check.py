"""diffloom's VAE decode and encode against ComfyUI's own code, bit for bit, on a full-size checkpoint.

A manual check, not part of the test suite: it needs a ComfyUI source checkout (ComfyUI is not on PyPI;
any copy of 0.8, e.g. the pollockjj/ComfyUI fork, imported from COMFY_DIR, nothing of it committed here)
and a release build of diffloom.

Usage: .venv/bin/python tests/parity/comfy_vae_check.py COMFY_DIR CKPT.safetensors
(`scripts/bench.sh models` makes models/bench/full-sd1.safetensors, a full-size random SD 1.5 file.)

It decodes one seeded 64×64 latent (LoadLatent → VAEDecode → SaveImage) and encodes a 512² image
(LoadImage → VAEEncode → SaveLatent) with `diffloom run --no-disk-cache`, then runs ComfyUI's VAE
(comfy.sd.VAE on the same weights, --cpu) on the same inputs, once with each attention ComfyUI picks:
`--use-pytorch-cross-attention` (SDPA, its default on NVIDIA GPUs, and diffloom's) and its CPU default
(sliced bmm attention in the VAE). Prints the 8-bit values of the decoded image that differ and the
encoder's largest difference; exits 1 unless the SDPA run equals diffloom's exactly.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def diffloom(ckpt, work):
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    save_file({"latent_tensor": z, "latent_format_version_0": torch.tensor([])}, f"{work}/z.latent")
    y, x = np.mgrid[0:512, 0:512] / 512.0
    img = np.stack([np.sin(x * 9) * 0.5 + 0.5, np.cos(y * 7 + x * 3) * 0.5 + 0.5, x * y], -1)
    Image.fromarray((img * 255).astype(np.uint8)).save(f"{work}/in.png")
    graph = f"""(version: 1, nodes: {{
      "c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": "{ckpt}"}}),
      "l": (type: "LoadLatent", inputs: {{"latent": "{work}/z.latent"}}),
      "v": (type: "VAEDecode", inputs: {{"samples": Link("l", "LATENT"), "vae": Link("c", "VAE")}}),
      "s": (type: "SaveImage", inputs: {{"images": Link("v", "IMAGE"), "filename_prefix": "dec"}}),
      "i": (type: "LoadImage", inputs: {{"image": "{work}/in.png"}}),
      "e": (type: "VAEEncode", inputs: {{"pixels": Link("i", "IMAGE"), "vae": Link("c", "VAE")}}),
      "sl": (type: "SaveLatent", inputs: {{"samples": Link("e", "LATENT"), "filename_prefix": "enc"}})}})"""
    with open(f"{work}/g.ron", "w") as f:
        f.write(graph)
    subprocess.run([f"{ROOT}/target/release/diffloom", "run", f"{work}/g.ron", "-o", f"{work}/out", "--no-disk-cache"],
                   check=True, stdout=subprocess.DEVNULL)
    image = np.array(Image.open(f"{work}/out/dec_00001_.png").convert("RGB")).astype(int)
    return z, image, load_file(f"{work}/out/enc_00001_.latent")["latent_tensor"].float()


def comfy(comfy_dir, ckpt, work, flags):
    """ComfyUI's VAE in a fresh interpreter (its attention is chosen at import from the flags)."""
    script = f"""
import sys
sys.argv = ["comfy", "--cpu"] + {flags!r}
sys.path.insert(0, {comfy_dir!r})
import comfy.options
comfy.options.enable_args_parsing()
import numpy as np, torch, comfy.sd
from PIL import Image
from safetensors.torch import load_file, save_file
torch.set_grad_enabled(False)
sd = load_file({ckpt!r})
vae = comfy.sd.VAE(sd={{k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}})
img = vae.decode(load_file({work!r} + "/z.latent")["latent_tensor"].float())
pixels = torch.from_numpy(np.array(Image.open({work!r} + "/in.png").convert("RGB")).astype(np.float32) / 255.0)[None]
save_file({{"image": img.contiguous(), "latent": vae.encode(pixels).float().contiguous()}}, {work!r} + "/comfy.safetensors")
"""
    subprocess.run([sys.executable, "-c", script], check=True, stderr=subprocess.DEVNULL)
    out = load_file(f"{work}/comfy.safetensors")
    # ComfyUI's SaveImage: clip(255 · x) truncated to uint8.
    return np.clip(255.0 * out["image"][0].numpy(), 0, 255).astype(np.uint8).astype(int), out["latent"]


def main(comfy_dir, ckpt):
    with tempfile.TemporaryDirectory() as work:
        _, image, latent = diffloom(os.path.abspath(ckpt), work)
        exact = False
        for name, flags in [("SDPA (--use-pytorch-cross-attention)", ["--use-pytorch-cross-attention"]), ("CPU default", [])]:
            theirs, their_latent = comfy(comfy_dir, os.path.abspath(ckpt), work, flags)
            differing = int((image != theirs).sum())
            enc = (latent - their_latent).abs().max().item()
            print(f"ComfyUI, {name}: decode {differing} of {image.size} 8-bit values differ "
                  f"(max {int(np.abs(image - theirs).max())}); encode max abs difference {enc:.3g}")
            if flags:
                exact = differing == 0 and enc == 0.0
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
