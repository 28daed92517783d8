"""Hypernetwork files in A1111's format (torch.save of a dict keyed by text-state width, with the
options beside), and what ComfyUI's hypernetwork patch does to a cross-attention's k and v with them.

Usage: hypernetwork_reference.py OUT_DIR
Writes OUT_DIR/<name>.pt for name in relu_ln (ReLU, layer norms) and mish_out (Mish, activated output,
no layer norms), and OUT_DIR/hypernetwork_expected.safetensors: input.context [2, 77, 32] and, for
each name, <name>.k and <name>.v = ComfyUI's hypernetwork_patch(q, k, v) at strength 0.8 with k = v =
the context (comfy_extras/nodes_hypernetwork.py load_hypernetwork_patch, copied below without the
file reading). CPU, float32, seeded. The files have use_dropout False: ComfyUI builds the
networks in training mode, so its Dropout layers would drop at random (diffloom leaves them out).
"""

import collections
import os
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
g = torch.Generator().manual_seed(5)
r = lambda *s: torch.randn(*s, generator=g) * 0.3


def mlp_state(width, hidden, layer_norm):
    """A1111's HypernetworkModule state: Linear, activation (no parameters), LayerNorm, … by index."""
    sd = collections.OrderedDict()
    sd["linear.0.weight"], sd["linear.0.bias"] = r(hidden, width), r(hidden)
    i = 2
    if layer_norm:
        sd["linear.2.weight"], sd["linear.2.bias"] = 1 + r(hidden), r(hidden)
        i = 4
    sd[f"linear.{i}.weight"], sd[f"linear.{i}.bias"] = r(width, hidden), r(width)
    if layer_norm:
        sd[f"linear.{i + 1}.weight"], sd[f"linear.{i + 1}.bias"] = 1 + r(width), r(width)
    return sd


def comfy_patch(sd, strength):
    # comfy_extras/nodes_hypernetwork.py: load_hypernetwork_patch, from `sd`.
    activation_func = sd.get('activation_func', 'linear')
    is_layer_norm = sd.get('is_layer_norm', False)
    use_dropout = sd.get('use_dropout', False)
    activate_output = sd.get('activate_output', False)
    last_layer_dropout = sd.get('last_layer_dropout', False)
    valid_activation = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
                        "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh,
                        "sigmoid": torch.nn.Sigmoid, "softsign": torch.nn.Softsign, "mish": torch.nn.Mish}
    out = {}
    for d in sd:
        try:
            dim = int(d)
        except Exception:
            continue
        output = []
        for index in [0, 1]:
            attn_weights = sd[dim][index]
            keys = attn_weights.keys()
            linears = filter(lambda a: a.endswith(".weight"), keys)
            linears = list(map(lambda a: a[:-len(".weight")], linears))
            layers = []
            i = 0
            while i < len(linears):
                lin_name = linears[i]
                last_layer = (i == (len(linears) - 1))
                penultimate_layer = (i == (len(linears) - 2))
                lin_weight = attn_weights['{}.weight'.format(lin_name)]
                lin_bias = attn_weights['{}.bias'.format(lin_name)]
                layer = torch.nn.Linear(lin_weight.shape[1], lin_weight.shape[0])
                layer.load_state_dict({"weight": lin_weight, "bias": lin_bias})
                layers.append(layer)
                if activation_func != "linear":
                    if (not last_layer) or (activate_output):
                        layers.append(valid_activation[activation_func]())
                if is_layer_norm:
                    i += 1
                    ln_name = linears[i]
                    ln_weight = attn_weights['{}.weight'.format(ln_name)]
                    ln_bias = attn_weights['{}.bias'.format(ln_name)]
                    ln = torch.nn.LayerNorm(ln_weight.shape[0])
                    ln.load_state_dict({"weight": ln_weight, "bias": ln_bias})
                    layers.append(ln)
                if use_dropout:
                    if (not last_layer) and (not penultimate_layer or last_layer_dropout):
                        layers.append(torch.nn.Dropout(p=0.3))
                i += 1
            output.append(torch.nn.Sequential(*layers))
        out[dim] = torch.nn.ModuleList(output)

    def patch(q, k, v):
        dim = k.shape[-1]
        if dim in out:
            hn = out[dim]
            k = k + hn[0](k) * strength
            v = v + hn[1](v) * strength
        return q, k, v
    return patch


context = torch.randn(2, 77, 32, generator=g)
expected = {"input.context": context}
for name, act, ln, act_out in [("relu_ln", "relu", True, False), ("mish_out", "mish", False, True)]:
    sd = {32: [mlp_state(32, 64, ln), mlp_state(32, 64, ln)], 64: [mlp_state(64, 16, ln), mlp_state(64, 16, ln)],
          "activation_func": act, "is_layer_norm": ln, "use_dropout": False, "activate_output": act_out,
          "last_layer_dropout": False, "name": name, "step": 100}
    torch.save(sd, os.path.join(out, f"{name}.pt"))
    with torch.no_grad():
        _, k, v = comfy_patch(sd, 0.8)(None, context, context)
    expected[f"{name}.k"], expected[f"{name}.v"] = k.contiguous(), v.contiguous()
save_file(expected, os.path.join(out, "hypernetwork_expected.safetensors"))
