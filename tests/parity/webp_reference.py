"""ComfyUI 0.8's SaveAnimatedWEBP (comfy_extras/nodes_images.py, comfy_api/latest/_ui.py) against diffloom's
(tests/image_codecs.rs).

Usage: webp_reference.py FRAMES FPS LOSSLESS QUALITY METHOD PROMPT_JSON WORKFLOW_JSON DIFFLOOM_WEBP OUT_WEBP
FRAMES is a safetensors file with `images` [B, H, W, C] (float32); LOSSLESS is 0 or 1; METHOD is ComfyUI's
name (default, fastest, slowest). Writes OUT_WEBP with ComfyUI's node body (Pillow), then checks DIFFLOOM_WEBP:
the same RIFF chunk sequence (VP8X flags, ANIM, ANMF count and frame headers, EXIF bytes), what Pillow reads
(size, frame count, per-frame durations, loop, background, EXIF tags), lossless frames equal to the 8-bit
input, and lossy frames as close to the input as Pillow's own encode (PSNR within 1 dB; bit-exact is not
expected: diffloom's libwebp and the one in Pillow's wheel may differ). Prints the figures; exits non-zero
on a difference.
"""

import json
import sys

import numpy as np
from PIL import Image, features
from safetensors.numpy import load_file

COMPRESS_METHODS = {"default": 4, "fastest": 0, "slowest": 6}


def comfy_save(images, fps, lossless, quality, method, prompt, extra_pnginfo, path):
    # ImageSaveHelper.save_animated_webp and _create_webp_metadata, file naming aside.
    pil_images = [Image.fromarray(np.clip(255.0 * img, 0, 255).astype(np.uint8)) for img in images]
    exif_data = pil_images[0].getexif()
    if prompt is not None:
        exif_data[0x0110] = "prompt:{}".format(json.dumps(prompt))
    if extra_pnginfo is not None:
        inital_exif_tag = 0x010F
        for key, value in extra_pnginfo.items():
            exif_data[inital_exif_tag] = "{}:{}".format(key, json.dumps(value))
            inital_exif_tag -= 1
    pil_images[0].save(
        path,
        save_all=True,
        duration=int(1000.0 / fps),
        append_images=pil_images[1:],
        exif=exif_data,
        lossless=lossless,
        quality=quality,
        method=COMPRESS_METHODS[method],
    )
    return [np.asarray(p) for p in pil_images]


def chunks(path):
    data = open(path, "rb").read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP", path
    assert int.from_bytes(data[4:8], "little") == len(data) - 8, (path, "RIFF size")
    pos, out = 12, []
    while pos < len(data):
        kind = data[pos:pos + 4]
        n = int.from_bytes(data[pos + 4:pos + 8], "little")
        out.append((kind, data[pos + 8:pos + 8 + n]))
        pos += 8 + n + (n & 1)
    return out


def headers(cs):
    """The chunks with what must match byte for byte: VP8X, ANIM, EXIF in full, ANMF's 16-byte frame
    header (offset, size, duration, blend/dispose bits), and only the kind of the bitstream chunks."""
    out = []
    for kind, body in cs:
        if kind in (b"VP8X", b"ANIM", b"EXIF"):
            out.append((kind, body))
        elif kind == b"ANMF":
            out.append((kind, body[:16]))
        else:
            out.append((kind, None))
    return out


def decoded(path):
    im = Image.open(path)
    frames = []
    for k in range(getattr(im, "n_frames", 1)):
        im.seek(k)
        frames.append((np.array(im.convert("RGBA")), im.info.get("duration")))
    info = {k: im.info.get(k) for k in ("loop", "background")}
    return im.size, frames, info, dict(im.getexif())


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main():
    frames_path, fps, lossless, quality, method, prompt, workflow, ours, theirs = sys.argv[1:10]
    images = load_file(frames_path)["images"]
    lossless = lossless == "1"
    sources = comfy_save(images, float(fps), lossless, int(quality), method, json.loads(prompt), {"workflow": json.loads(workflow)}, theirs)
    a, b = chunks(ours), chunks(theirs)
    ha, hb = headers(a), headers(b)
    exif = lambda cs: [body for kind, body in cs if kind == b"EXIF"]
    if exif(a) != exif(b):
        sys.exit(f"EXIF differs:\n diffloom {exif(a)}\n comfyui  {exif(b)}")
    if [k for k, _ in ha] != [k for k, _ in hb]:
        sys.exit(f"chunk sequence differs:\n diffloom {[k for k, _ in ha]}\n comfyui  {[k for k, _ in hb]}")
    if lossless and ha != hb:
        # Lossless frames are compared as rectangles: libwebp picks the same sub-frames for the same pixels.
        sys.exit(f"chunk headers differ:\n diffloom {ha}\n comfyui  {hb}")
    if not lossless and [h for h in ha if h[0] in (b"VP8X", b"ANIM")] != [h for h in hb if h[0] in (b"VP8X", b"ANIM")]:
        sys.exit(f"VP8X/ANIM differ:\n diffloom {ha}\n comfyui  {hb}")
    (sa, da, ia, ea), (sb, db, ib, eb) = decoded(ours), decoded(theirs)
    if sa != sb or len(da) != len(db) or ia != ib or ea != eb:
        sys.exit(f"Pillow reads differently: size {sa} vs {sb}, {len(da)} vs {len(db)} frames, {ia} vs {ib}, exif {ea} vs {eb}")
    psnrs = []
    # libwebp merges identical neighbours into one longer frame: a frame shows the input at its start time.
    start, step = 0, int(1000.0 / float(fps))
    if len(sources) == 1:
        # One image: Pillow writes a still WebP (no ANIM/ANMF, no duration).
        if len(db) != 1 or db[0][1] not in (None, 0) or any(k in (b"ANIM", b"ANMF") for k, _ in hb):
            sys.exit(f"one image should be a still WebP: {[k for k, _ in hb]}, {len(db)} frames")
        db = [(db[0][0], step)]
        da = [(da[0][0], step)]
    if sum(t for _, t in db) != step * len(sources):
        sys.exit(f"ComfyUI's frames last {sum(t for _, t in db)} ms in all, not {len(sources)} x {step}")
    for k, ((pa, ta), (pb, tb)) in enumerate(zip(da, db)):
        if ta != tb:
            sys.exit(f"frame {k}: duration {ta} vs ComfyUI's {tb}")
        src = sources[start // step]
        start += tb
        c = src.shape[-1]
        pa, pb = pa[..., :c], pb[..., :c]
        if lossless:
            # Fully transparent pixels keep their alpha only (libwebp's exact=0 may change their colour).
            keep = src[..., 3:] > 0 if c == 4 else np.ones(src.shape[:2] + (1,), bool)
            for name, p in (("diffloom", pa), ("ComfyUI", pb)):
                if not np.array_equal(np.where(keep, p, 0), np.where(keep, src, 0)) or (c == 4 and not np.array_equal(p[..., 3], src[..., 3])):
                    sys.exit(f"frame {k}: {name}'s lossless frame differs from the 8-bit input")
        else:
            ours_db, theirs_db = psnr(pa, src), psnr(pb, src)
            psnrs.append((ours_db, theirs_db, psnr(pa, pb)))
            if ours_db < theirs_db - 1.0:
                sys.exit(f"frame {k}: PSNR {ours_db:.2f} dB against the input, Pillow's encode {theirs_db:.2f} dB")
    durations = [t for _, t in da]
    detail = "lossless, frames equal the input" if lossless else "PSNR vs input (diffloom, Pillow, diffloom vs Pillow): " + ", ".join(f"({x:.2f}, {y:.2f}, {z:.2f})" for x, y, z in psnrs)
    same = "byte-identical files" if open(ours, "rb").read() == open(theirs, "rb").read() else "files differ in compressed data"
    print(f"ok ({same}): Pillow {Image.__version__}, its libwebp {features.version('webp')}; {len(sources)} images as {len(da)} frames of {durations} ms, {[k for k, _ in ha]}; {detail}")


if __name__ == "__main__":
    main()
