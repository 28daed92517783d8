"""diffusers' side of the cold-start benchmark (tests/bench/coldstart.rs): from process start to a saved
PNG, txt2img 512², 20 Euler steps, cfg 7, on the full-size random SD 1.5 checkpoint, on the CPU in fp32.

Usage: coldstart_reference.py CKPT CONFIG.json OUT.png  ->  prints one JSON line of phase times (s) and
the peak resident memory (bytes).

The pipeline is diffusers' StableDiffusionPipeline over the checkpoint's parts converted by diffusers'
own single-file code (the parity scripts' builders, tests/parity/reference.py), the configuration the
checkpoint was written with (diffloom's ModelConfig as JSON: the file itself carries none, as released
checkpoints do not), the CLIP tokenizer the set-up extracts, no safety checker.
"""
import time

START = time.perf_counter()
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity"))
import torch  # noqa: E402
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

import reference as ref  # noqa: E402

IMPORTED = time.perf_counter()


def main(ckpt_path, config_path, out_path):
    torch.set_grad_enabled(False)
    with open(config_path) as f:
        cfg = json.load(f)
    ckpt = load_file(ckpt_path)
    orig = ref.original_config(cfg)
    unet, vae, clip = ref.build_unet(cfg, orig, ckpt), ref.build_vae(orig, ckpt), ref.build_clip(cfg, ckpt)
    del ckpt
    tok_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "clip-tokenizer")
    tok = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    # SD 1.5's scheduler config, as ComfyUI's "normal" schedule with euler samples it.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    loaded = time.perf_counter()
    image = pipe("a lighthouse on a cliff at dusk, (oil painting:1.2), dramatic sky", negative_prompt="blurry, low quality",
                 num_inference_steps=20, guidance_scale=7.0, height=512, width=512,
                 generator=torch.Generator().manual_seed(42)).images[0]
    sampled = time.perf_counter()
    image.save(out_path)
    saved = time.perf_counter()
    print(json.dumps({
        "import_s": IMPORTED - START, "load_s": loaded - IMPORTED, "generate_s": sampled - loaded,
        "save_s": saved - sampled, "threads": torch.get_num_threads(),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
