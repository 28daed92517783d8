"""ComfyUI 0.8's SaveAnimatedPNG (comfy_extras/nodes_images.py) against diffloom's (tests/image_codecs.rs).

Usage: apng_reference.py FRAMES FPS COMPRESS_LEVEL PROMPT_JSON WORKFLOW_JSON DIFFLOOM_PNG OUT_PNG
FRAMES is a safetensors file with `images` [B, H, W, C] (float32). Writes OUT_PNG with ComfyUI's node body
(Pillow's APNG writer), then checks that DIFFLOOM_PNG has the same chunk sequence (acTL, fcTL with sizes,
offsets, delays, dispose and blend ops, and the `comf` chunks' bytes; IDAT/fdAT contents aside) and that
Pillow decodes the same frames, durations and loop count from both. Exits non-zero on a difference.
"""

import json
import struct
import sys
import zlib

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.numpy import load_file


def comfy_save(images, fps, compress_level, prompt, extra_pnginfo, path):
    # The body of SaveAnimatedPNG.execute, file naming aside.
    pil_images = []
    for image in images:
        i = 255. * image
        img = Image.fromarray(np.clip(i, 0, 255).astype(np.uint8))
        pil_images.append(img)
    metadata = PngInfo()
    if prompt is not None:
        metadata.add(b"comf", "prompt".encode("latin-1", "strict") + b"\0" + json.dumps(prompt).encode("latin-1", "strict"), after_idat=True)
    if extra_pnginfo is not None:
        for x in extra_pnginfo:
            metadata.add(b"comf", x.encode("latin-1", "strict") + b"\0" + json.dumps(extra_pnginfo[x]).encode("latin-1", "strict"), after_idat=True)
    pil_images[0].save(path, pnginfo=metadata, compress_level=compress_level, save_all=True, duration=int(1000.0 / fps), append_images=pil_images[1:])


def chunks(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body), (path, kind)
        pos += 12 + n
        if kind in (b"IDAT", b"fdAT"):
            if out and out[-1][0] == kind:
                continue
            body = b""
        out.append((kind, body))
    return out


def decoded(path):
    im = Image.open(path)
    frames = []
    for k in range(getattr(im, "n_frames", 1)):
        im.seek(k)
        frames.append((np.array(im.convert("RGBA")), im.info.get("duration"), im.info.get("loop")))
    return frames


def main():
    frames_path, fps, level, prompt, workflow, ours, theirs = sys.argv[1:8]
    images = load_file(frames_path)["images"]
    comfy_save(images, float(fps), int(level), json.loads(prompt), {"workflow": json.loads(workflow)}, theirs)
    a, b = chunks(ours), chunks(theirs)
    # IHDR and the chunk sequence match (the compressed data itself need not).
    strip = lambda cs: [(k, v) for k, v in cs if k not in (b"IDAT", b"fdAT")]
    kinds = lambda cs: [k for k, _ in cs]
    if kinds(a) != kinds(b) or strip(a) != strip(b):
        sys.exit(f"chunks differ:\n diffloom {strip(a)}\n comfyui  {strip(b)}")
    da, db = decoded(ours), decoded(theirs)
    if len(da) != len(db):
        sys.exit(f"{len(da)} frames, ComfyUI's file has {len(db)}")
    for k, ((pa, ta, la), (pb, tb, lb)) in enumerate(zip(da, db)):
        if not np.array_equal(pa, pb) or ta != tb or la != lb:
            sys.exit(f"frame {k} differs: duration {ta} vs {tb}, loop {la} vs {lb}")
    print(f"ok: {len(da)} frames, {kinds(a)}")


if __name__ == "__main__":
    main()
