"""Saves an image as ComfyUI's SaveAnimatedWEBP does (nodes.py / comfy_extras/nodes_images.py): lossless
WebP with the API prompt in EXIF Model (0x0110) as "prompt:{json}" and each extra_pnginfo entry in the
tags counting down from Make (0x010f) as "workflow:{json}".

Usage: comfy_webp.py IN.png PROMPT.json WORKFLOW.json OUT.webp
"""

import json
import sys

from PIL import Image

src, prompt_file, workflow_file, out = sys.argv[1:5]
img = Image.open(src).convert("RGB")
prompt = json.load(open(prompt_file))
extra_pnginfo = {"workflow": json.load(open(workflow_file))}

metadata = img.getexif()
num_frames = 1
metadata[0x0110] = "prompt:{}".format(json.dumps(prompt))
initial_exif = 0x010F
for x in extra_pnginfo:
    metadata[initial_exif] = "{}:{}".format(x, json.dumps(extra_pnginfo[x]))
    initial_exif -= 1
img.save(out, save_all=True, duration=int(1000.0 / 6.0), append_images=[], exif=metadata, lossless=True, quality=80, method=4)
