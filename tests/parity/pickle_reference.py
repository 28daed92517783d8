"""Writes PyTorch pickle files with torch.save, and what torch.load(weights_only=True) reads from them as
safetensors (each tensor made contiguous), for the pickle reader's parity test.

Usage: pickle_reference.py OUT_DIR
Writes OUT_DIR/NAME.pt and OUT_DIR/NAME.expected.safetensors for each case, and refused.pt (a pickle
that calls os.system) plus not_torch.pkl (a plain pickle).
"""

import collections
import os
import pickle
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
g = torch.Generator().manual_seed(7)
r = lambda *s: torch.randn(*s, generator=g)

base = r(6, 8)
shared = r(10)
cases = {
    "dtypes": {
        "f32": r(3, 4), "f16": r(5).half(), "bf16": r(2, 3).bfloat16(), "f64": r(4).double(),
        "i64": torch.arange(-5, 7), "i32": torch.arange(9, dtype=torch.int32) - 4, "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
    },
    "views": {
        "transposed": base.t(), "sliced": base[2:5, 1:7:2], "row": base[3], "column": base[:, 5],
        "shared_a": shared[:4], "shared_b": shared[6:], "expanded": r(1, 3).expand(4, 3),
    },
    "lightning": {"state_dict": {"model.diffusion_model.w": r(2, 2), "first_stage_model.b": r(3)}, "global_step": 12, "epoch": 1},
    "esrgan": {"params_ema": collections.OrderedDict([("conv_first.weight", r(4, 3, 3, 3)), ("conv_first.bias", r(4))])},
    "embedding": {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(r(2, 8))}, "name": "x", "step": 3},
    "ordered": collections.OrderedDict([("b", r(2)), ("a", torch.nn.Parameter(r(3), requires_grad=False))]),
}
for name, obj in cases.items():
    for fmt in ("zip", "legacy"):
        path = os.path.join(out, f"{name}.{fmt}.pt")
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
        loaded = torch.load(path, weights_only=True)
        # As ComfyUI's load_torch_file: state_dict, else a one-key dict's dict, else the root; nested
        # dicts (and lists, by index) flattened with ".".
        if "state_dict" in loaded:
            loaded = loaded["state_dict"]
        elif len(loaded) == 1 and isinstance(next(iter(loaded.values())), dict):
            loaded = next(iter(loaded.values()))
        flat = {}
        def walk(d, prefix):
            for k, v in d.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if isinstance(v, torch.Tensor):
                    flat[key] = v.detach().contiguous().clone()
                elif isinstance(v, dict):
                    walk(v, key)
                elif isinstance(v, (list, tuple)):
                    walk(dict(enumerate(v)), key)
        walk(loaded, "")
        save_file(flat, os.path.join(out, f"{name}.{fmt}.expected.safetensors"))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


torch.save({"weight": torch.zeros(2), "evil": Evil()}, os.path.join(out, "refused.pt"))
with open(os.path.join(out, "not_torch.pkl"), "wb") as f:
    pickle.dump({"a": 1}, f, protocol=2)
