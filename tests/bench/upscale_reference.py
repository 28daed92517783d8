"""spandrel's untiled 4× upscale, for diffloom's upscale benchmark (tests/bench/upscale.rs runs this).

Usage: upscale_reference.py MODEL.safetensors SIZE  ->  prints one JSON line {"seconds": .., "peak_rss": ..}

The model is loaded by spandrel's own loader and run, untiled, fp32 on the CPU, on a SIZE×SIZE random
image, as a program without tiling would; peak_rss is the process's peak resident memory in bytes
(ru_maxrss) minus what it held before the run.
"""
import json
import resource
import sys
import time

import torch
from spandrel import ModelLoader


def rss_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    path, size = sys.argv[1], int(sys.argv[2])
    desc = ModelLoader(device="cpu").load_from_file(path)
    model = desc.model.float().eval()
    torch.manual_seed(0)
    image = torch.rand(1, 3, size, size)
    before = rss_peak()
    start = time.perf_counter()
    with torch.no_grad():
        out = desc(image)
    seconds = time.perf_counter() - start
    assert out.shape[-1] == size * desc.scale
    print(json.dumps({"seconds": seconds, "peak_rss": rss_peak() - before}))


if __name__ == "__main__":
    main()
