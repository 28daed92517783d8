"""Queues an API-format workflow on a ComfyUI server with an unmodified client from PyPI
(comfy-api-simplified) and writes the image it gets back.

Usage: comfy_api_client.py URL WORKFLOW.json OUTPUT_NODE_TITLE OUT.png
"""

import sys

from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

url, workflow, title, out = sys.argv[1:5]
api = ComfyApiWrapper(url)
wf = ComfyWorkflowWrapper(workflow)
wf.set_node_param("Positive", "text", "a lighthouse at dusk, {oil|acrylic} painting")
images = api.queue_and_wait_images(wf, title)
assert len(images) == 1, images.keys()
with open(out, "wb") as f:
    f.write(next(iter(images.values())))
print(api.get_queue())
