#!/usr/bin/env python3
"""Reference outputs of a UNet and text encoder with a LoRA applied, for diffloom's LoRA parity test.

Usage:  .venv/bin/python tests/parity/lora_reference.py CKPT LORA OUT STRENGTH_UNET STRENGTH_TEXT [SAVE_DIR]

CKPT is a tiny single-file checkpoint as for reference.py, converted by diffusers' own single-file code
(reference.py's builders). LORA is a kohya-format .safetensors file; it is applied by diffusers' own
LoRA loading (StableDiffusionPipeline.load_lora_weights: kohya → diffusers key conversion, PEFT
adapters), with the UNet and text-encoder strengths set by set_adapters. The script fails unless every
module of the file became an adapter layer, so nothing is silently skipped on this side.

OUT receives the inputs of reference.py's make_inputs and out.unet, out.clip_last,
out.clip_hidden_m2_ln (the SD 2.x conditioning layer). fp32, CPU, offline.
With SAVE_DIR, the loaded adapters are also written back by diffusers' own save_lora_weights, in the
diffusers/PEFT layout (unet.*/text_encoder.* lora_A/lora_B, alphas in the lora_adapter_metadata), as
SAVE_DIR/pytorch_lora_weights.safetensors: the same LoRA in the other format diffloom reads.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import reference as ref  # noqa: E402


def adapter_layers(module):
    return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and "k" in m.lora_A)


def main():
    if len(sys.argv) not in (6, 7):
        sys.exit(__doc__)
    ckpt_path, lora_path, out_path = sys.argv[1:4]
    s_unet, s_text = float(sys.argv[4]), float(sys.argv[5])
    with safe_open(ckpt_path, "pt") as f:
        cfg = json.loads((f.metadata() or {})["diffloom.config"])
    ckpt = load_file(ckpt_path)
    torch.set_grad_enabled(False)
    inputs = ref.make_inputs(cfg)
    orig = ref.original_config(cfg)
    unet, vae, clip = ref.build_unet(cfg, orig, ckpt), ref.build_vae(orig, ckpt), ref.build_clip(cfg, ckpt)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora_path, adapter_name="k")
    pipe.set_adapters(["k"], adapter_weights=[{"unet": s_unet, "text_encoder": s_text}])
    with safe_open(lora_path, "pt") as f:
        keys = list(f.keys())
    n_unet = sum(1 for k in keys if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))
    n_text = sum(1 for k in keys if k.startswith("lora_te_") and k.endswith(".lora_down.weight"))
    got_unet, got_text = adapter_layers(pipe.unet), adapter_layers(pipe.text_encoder)
    print(f"{lora_path}: {n_unet} UNet and {n_text} text-encoder modules; diffusers made {got_unet} and {got_text} adapter layers")
    if (got_unet, got_text) != (n_unet, n_text):
        ref.fail("diffusers did not apply every module of the LoRA file")

    out = {"out.unet": pipe.unet(inputs["input.latent"], inputs["input.timesteps"],
                                 encoder_hidden_states=inputs["input.context"]).sample}
    text = pipe.text_encoder(input_ids=inputs["input.tokens"], output_hidden_states=True)
    out["out.clip_last"] = text.last_hidden_state
    out["out.clip_hidden_m2_ln"] = pipe.text_encoder.final_layer_norm(text.hidden_states[-2])
    tensors = {k: t.float().contiguous() if k.startswith("out.") else t.contiguous() for k, t in {**inputs, **out}.items()}
    save_file(tensors, out_path)
    print(f"wrote {out_path}")
    if len(sys.argv) == 7:
        StableDiffusionPipeline.save_lora_weights(
            sys.argv[6],
            unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="k"),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="k"),
            unet_lora_adapter_metadata=pipe.unet.peft_config["k"].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["k"].to_dict())
        print(f"wrote {sys.argv[6]}/pytorch_lora_weights.safetensors")


if __name__ == "__main__":
    main()
