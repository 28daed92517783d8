"""Writes PyTorch pickle files the way the real ones that ComfyUI's example workflows name are laid out,
from the tiny safetensors models (torch.save, zip format unless --legacy):

  checkpoint IN.safetensors OUT.ckpt      {"state_dict": ..., "global_step": 1, "epoch": 0} (pytorch lightning)
  upscaler IN.safetensors OUT.pth         {"params_ema": ...} (Real-ESRGAN's releases)
  embedding DIM ROWS SEED OUT.pt          A1111 textual inversion {"string_to_param": {"*": [ROWS, DIM]}, ...}
"""

import sys

import torch
from safetensors.torch import load_file

kind, *args = sys.argv[1:]
legacy = "--legacy" in args
args = [a for a in args if a != "--legacy"]
save = lambda obj, out: torch.save(obj, out, _use_new_zipfile_serialization=not legacy)

if kind == "checkpoint":
    src, out = args
    save({"state_dict": load_file(src), "global_step": 1, "epoch": 0}, out)
elif kind == "upscaler":
    src, out = args
    save({"params_ema": load_file(src)}, out)
elif kind == "embedding":
    dim, rows, seed, out = args
    g = torch.Generator().manual_seed(int(seed))
    vectors = torch.randn(int(rows), int(dim), generator=g) * 0.02
    save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "SDA768", "step": 1000,
          "sd_checkpoint": "4bdfc29c", "sd_checkpoint_name": "v2-1_768-ema-pruned"}, out)
else:
    raise SystemExit(f"unknown kind {kind}")
