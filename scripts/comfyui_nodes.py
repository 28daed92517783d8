#!/usr/bin/env python3
"""Writes comfy/data/comfyui_nodes.tsv: every node ComfyUI registers, with whether it applies to Stable
Diffusion 1.x/2.x workflows.

Usage: python3 scripts/comfyui_nodes.py COMFYUI_DIR > comfy/data/comfyui_nodes.tsv

Reads ComfyUI's sources without importing them (no torch needed): NODE_CLASS_MAPPINGS in nodes.py, then
every file nodes.py's init_builtin_extra_nodes and init_builtin_api_nodes load (comfy_extras/nodes_*.py,
comfy_api_nodes/nodes_*.py) — classic NODE_CLASS_MAPPINGS dicts and the V3 schemas (`io.Schema(node_id=…,
category=…)`) of the classes their extension's get_node_list returns. The classification below is by hand;
a file or node it does not know stops the script, so a newer ComfyUI gets looked at before it is listed.
CI never runs this; diffloom-comfy reads the TSV it wrote (comfy/src/coverage.rs).
"""

import ast
import datetime
import os
import re
import sys

# Why a node does not apply to SD 1.x/2.x workflows, per file (None: applicable) ...
SDXL = "SDXL only"
SD3 = "SD3 / SD3.5"
FLUX = "Flux"
HUNYUAN = "Hunyuan (DiT, Video, Image)"
LTXV = "LTX-Video"
WAN = "Wan"
COSMOS = "Cosmos"
AUDIO = "audio (Stable Audio, ACE-Step, audio encoders)"
VIDEO = "video models and video files (SVD, context windows over frames, …)"
THREE_D = "3D models (Stable Zero123, SV3D, Hunyuan3D, 3D files)"
TRAINING = "LoRA training and its datasets (diffloom runs inference)"
DIT = "DiT and RoPE models (SD3, Flux, Wan, …)"
API = "paid API nodes (ComfyUI's hosted partner services)"
CASCADE = "Stable Cascade"
AURAFLOW = "AuraFlow"
QWEN = "Qwen-Image"
PYTORCH = "PyTorch runtime features (torch.compile)"

FILES = {
    "nodes.py": None,
    "comfy_extras/nodes_latent.py": None,
    "comfy_extras/nodes_hypernetwork.py": None,
    "comfy_extras/nodes_upscale_model.py": None,
    "comfy_extras/nodes_post_processing.py": None,
    "comfy_extras/nodes_mask.py": None,
    "comfy_extras/nodes_compositing.py": None,
    "comfy_extras/nodes_rebatch.py": None,
    "comfy_extras/nodes_model_merging.py": None,
    "comfy_extras/nodes_tomesd.py": None,
    "comfy_extras/nodes_clip_sdxl.py": SDXL,
    "comfy_extras/nodes_canny.py": None,
    "comfy_extras/nodes_freelunch.py": None,
    "comfy_extras/nodes_custom_sampler.py": None,
    "comfy_extras/nodes_hypertile.py": None,
    "comfy_extras/nodes_model_advanced.py": None,
    "comfy_extras/nodes_model_downscale.py": None,
    "comfy_extras/nodes_images.py": None,
    "comfy_extras/nodes_video_model.py": VIDEO,
    "comfy_extras/nodes_train.py": TRAINING,
    "comfy_extras/nodes_dataset.py": TRAINING,
    "comfy_extras/nodes_sag.py": None,
    "comfy_extras/nodes_perpneg.py": None,
    "comfy_extras/nodes_stable3d.py": THREE_D,
    "comfy_extras/nodes_sdupscale.py": None,  # the x4 upscaler is an SD 2.x model
    "comfy_extras/nodes_photomaker.py": SDXL,
    "comfy_extras/nodes_pixart.py": "PixArt",
    "comfy_extras/nodes_cond.py": None,
    "comfy_extras/nodes_morphology.py": None,
    "comfy_extras/nodes_stable_cascade.py": CASCADE,
    "comfy_extras/nodes_differential_diffusion.py": None,
    "comfy_extras/nodes_ip2p.py": None,
    "comfy_extras/nodes_model_merging_model_specific.py": None,
    "comfy_extras/nodes_pag.py": None,
    "comfy_extras/nodes_align_your_steps.py": None,
    "comfy_extras/nodes_attention_multiply.py": None,
    "comfy_extras/nodes_advanced_samplers.py": None,
    "comfy_extras/nodes_webcam.py": None,
    "comfy_extras/nodes_audio.py": AUDIO,
    "comfy_extras/nodes_sd3.py": SD3,
    "comfy_extras/nodes_gits.py": None,
    "comfy_extras/nodes_controlnet.py": "union and AliMama inpainting ControlNets (SDXL, SD3, Flux)",
    "comfy_extras/nodes_hunyuan.py": HUNYUAN,
    "comfy_extras/nodes_eps.py": None,
    "comfy_extras/nodes_flux.py": FLUX,
    "comfy_extras/nodes_lora_extract.py": None,
    "comfy_extras/nodes_torch_compile.py": PYTORCH,
    "comfy_extras/nodes_mochi.py": "Mochi",
    "comfy_extras/nodes_slg.py": DIT,
    "comfy_extras/nodes_mahiro.py": None,
    "comfy_extras/nodes_lt_upsampler.py": LTXV,
    "comfy_extras/nodes_lt_audio.py": LTXV,
    "comfy_extras/nodes_lt.py": LTXV,
    "comfy_extras/nodes_hooks.py": None,
    "comfy_extras/nodes_load_3d.py": THREE_D,
    "comfy_extras/nodes_cosmos.py": COSMOS,
    "comfy_extras/nodes_video.py": VIDEO,
    "comfy_extras/nodes_lumina2.py": "Lumina 2",
    "comfy_extras/nodes_wan.py": WAN,
    "comfy_extras/nodes_lotus.py": None,  # Lotus is an SD 2.x model
    "comfy_extras/nodes_hunyuan3d.py": THREE_D,
    "comfy_extras/nodes_primitive.py": None,
    "comfy_extras/nodes_cfg.py": None,
    "comfy_extras/nodes_optimalsteps.py": "Flux, Wan and Chroma noise levels",
    "comfy_extras/nodes_hidream.py": "HiDream",
    "comfy_extras/nodes_fresca.py": None,
    "comfy_extras/nodes_apg.py": None,
    "comfy_extras/nodes_preview_any.py": None,
    "comfy_extras/nodes_ace.py": AUDIO,
    "comfy_extras/nodes_string.py": None,
    "comfy_extras/nodes_camera_trajectory.py": WAN,
    "comfy_extras/nodes_edit_model.py": "edit models (Flux Kontext, Qwen-Image-Edit, …)",
    "comfy_extras/nodes_tcfg.py": None,
    "comfy_extras/nodes_context_windows.py": None,
    "comfy_extras/nodes_qwen.py": QWEN,
    "comfy_extras/nodes_chroma_radiance.py": "Chroma",
    "comfy_extras/nodes_model_patch.py": "model patches for Qwen-Image, Z-Image and Flux",
    "comfy_extras/nodes_easycache.py": None,
    "comfy_extras/nodes_audio_encoder.py": AUDIO,
    "comfy_extras/nodes_rope.py": DIT,
    "comfy_extras/nodes_logic.py": None,
    "comfy_extras/nodes_nop.py": WAN,
    "comfy_extras/nodes_kandinsky5.py": "Kandinsky 5",
    "comfy_extras/nodes_wanmove.py": WAN,
}

# ... and the nodes whose file says otherwise.
NODES = {
    # nodes.py
    "DualCLIPLoader": "two text encoders (SDXL, SD3, Flux, …)",
    # nodes_latent.py
    "ReplaceVideoLatentFrames": VIDEO,
    # nodes_model_advanced.py
    "ModelSamplingStableCascade": CASCADE,
    "ModelSamplingSD3": SD3,
    "ModelSamplingAuraFlow": AURAFLOW,
    "ModelSamplingFlux": FLUX,
    # nodes_images.py: SVG comes only from the Recraft API nodes
    "SaveSVGNode": "SVG images (made only by the Recraft API nodes)",
    # nodes_cond.py
    "T5TokenizerOptions": "T5 text encoders (SD3, Flux, …)",
    # nodes_model_merging_model_specific.py
    "ModelMergeAuraflow": AURAFLOW,
    "ModelMergeMochiPreview": "Mochi",
    "ModelMergeQwenImage": QWEN,
    "ModelMergeSDXL": SDXL,
    "ModelMergeSD3_2B": SD3,
    "ModelMergeSD35_Large": SD3,
    "ModelMergeFlux1": FLUX,
    "ModelMergeLTXV": LTXV,
    "ModelMergeCosmos7B": COSMOS,
    "ModelMergeCosmos14B": COSMOS,
    "ModelMergeCosmosPredict2_2B": COSMOS,
    "ModelMergeCosmosPredict2_14B": COSMOS,
    "ModelMergeWAN2_1": WAN,
    # nodes_attention_multiply.py
    "UNetTemporalAttentionMultiply": VIDEO,
    # nodes_context_windows.py
    "WanContextWindowsManual": WAN,
}

API_DIR = "comfy_api_nodes/"


def registered_files(root):
    """nodes.py and the files nodes.py loads, in its order."""
    tree = ast.parse(open(os.path.join(root, "nodes.py")).read())
    out = [("nodes.py", tree)]
    for fn in tree.body:
        if isinstance(fn, ast.AsyncFunctionDef) and fn.name in ("init_builtin_extra_nodes", "init_builtin_api_nodes"):
            folder = "comfy_extras/" if fn.name == "init_builtin_extra_nodes" else API_DIR
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
                    for e in node.value.elts:
                        if isinstance(e, ast.Constant) and isinstance(e.value, str):
                            path = folder + e.value
                            if os.path.exists(os.path.join(root, path)):
                                out.append((path, ast.parse(open(os.path.join(root, path)).read())))
                            else:
                                sys.exit(f"{path}: listed in nodes.py, missing")
    return out


class Module:
    def __init__(self, tree):
        self.tree = tree
        self.consts = {}
        self.classes = {}
        for s in tree.body:
            if isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name):
                v = self.const(s.value)
                if v is not None:
                    self.consts[s.targets[0].id] = v
            elif isinstance(s, ast.ClassDef):
                self.classes[s.name] = s

    def const(self, e):
        """A string the expression always has, else None."""
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            return e.value
        if isinstance(e, ast.Name):
            return self.consts.get(e.id)
        if isinstance(e, ast.JoinedStr):
            parts = []
            for v in e.values:
                c = v.value if isinstance(v, ast.Constant) else self.const(v.value)
                if c is None:
                    return None
                parts.append(c)
            return "".join(parts)
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
            a, b = self.const(e.left), self.const(e.right)
            if a is not None and b is not None:
                return a + b
        return None

    def bases(self, c):
        return [self.classes[b.id] for b in c.bases if isinstance(b, ast.Name) and b.id in self.classes]

    def class_attr(self, c, name):
        """(value, found) of a class attribute, through the module's base classes."""
        for s in c.body:
            if isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in s.targets):
                return self.const(s.value), True
        for b in self.bases(c):
            v, found = self.class_attr(b, name)
            if found:
                return v, True
        return None, False

    def value(self, e, leaf):
        """A string, or `cls.ATTR` looked up on the concrete class."""
        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "cls":
            return self.class_attr(leaf, e.attr)[0]
        return self.const(e)

    def schema(self, c, leaf=None):
        """(node_id, category, found) of the io.Schema that define_schema returns."""
        leaf = leaf or c
        for s in c.body:
            if not (isinstance(s, ast.FunctionDef) and s.name == "define_schema"):
                continue
            nid = cat = None
            found = False
            for n in ast.walk(s):
                if not isinstance(n, ast.Call):
                    continue
                if getattr(n.func, "attr", getattr(n.func, "id", None)) in ("Schema", "SchemaV3"):
                    kw = {k.arg: k.value for k in n.keywords}
                    nid = self.value(kw["node_id"], leaf) if "node_id" in kw else None
                    cat = self.value(kw["category"], leaf) if "category" in kw else "sd"  # io.Schema's default
                    found = True
                elif (isinstance(n.func, ast.Attribute) and n.func.attr == "define_schema"
                      and isinstance(n.func.value, ast.Call) and getattr(n.func.value.func, "id", None) == "super"):
                    for b in self.bases(c):
                        nid, cat, found = self.schema(b, leaf)
                        if found:
                            break
            for n in ast.walk(s):  # schema.node_id = … after super().define_schema()
                if (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Attribute)
                        and isinstance(n.targets[0].value, ast.Name) and n.targets[0].value.id == "schema"):
                    if n.targets[0].attr == "node_id":
                        nid = self.value(n.value, leaf)
                    elif n.targets[0].attr == "category":
                        cat = self.value(n.value, leaf)
            if found:
                return nid, cat, True
        for b in self.bases(c):
            r = self.schema(b, leaf)
            if r[2]:
                return r
        return None, None, False


def nodes_of(path, tree):
    """(node id, category) of every node the file registers, in its order."""
    m = Module(tree)
    out = []

    def fail(what):
        sys.exit(f"{path}: {what}")

    for s in tree.body:
        # NODE_CLASS_MAPPINGS = {"Id": Class, …}
        if (isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS" for t in s.targets)
                and isinstance(s.value, ast.Dict)):
            for k, v in zip(s.value.keys, s.value.values):
                c = m.classes.get(v.id) if isinstance(v, ast.Name) else None
                nid, cat = m.const(k), m.class_attr(c, "CATEGORY")[0] if c else None
                if nid is None or cat is None:
                    fail(f"cannot read the mapping {ast.unparse(k)}: {ast.unparse(v)}")
                out.append((nid, cat))
        # for node in node_list: NODE_CLASS_MAPPINGS[node.NodeId] = node (nodes_hooks.py)
        if isinstance(s, ast.For) and isinstance(s.iter, ast.Name) and "NODE_CLASS_MAPPINGS" in ast.unparse(s):
            lst = next((x.value for x in tree.body if isinstance(x, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == s.iter.id for t in x.targets)), None)
            if not isinstance(lst, ast.List) or "NodeId" not in ast.unparse(s):
                fail("unknown NODE_CLASS_MAPPINGS loop")
            for e in lst.elts:
                c = m.classes[e.id]
                nid, cat = m.class_attr(c, "NodeId")[0], m.class_attr(c, "CATEGORY")[0]
                if nid is None or cat is None:
                    fail(f"cannot read {e.id}")
                out.append((nid, cat))
    # V3: async def get_node_list(self): return [Class, …]
    for s in ast.walk(tree):
        if isinstance(s, ast.AsyncFunctionDef) and s.name == "get_node_list":
            for r in (n for n in ast.walk(s) if isinstance(n, ast.Return)):
                if not isinstance(r.value, ast.List):
                    fail("get_node_list returns something other than a list")
                for e in r.value.elts:
                    c = m.classes.get(e.id) if isinstance(e, ast.Name) else None
                    if c is None:
                        fail(f"get_node_list: cannot resolve {ast.unparse(e)}")
                    nid, cat, _ = m.schema(c)
                    if nid is None or cat is None:
                        fail(f"cannot read {e.id}'s schema")
                    out.append((nid, cat))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = sys.argv[1]
    version = re.search(r'__version__\s*=\s*"([^"]+)"', open(os.path.join(root, "comfyui_version.py")).read()).group(1)
    rows, seen = [], {}
    for path, tree in registered_files(root):
        for nid, cat in nodes_of(path, tree):
            if nid in seen:
                if seen[nid] == path:
                    continue  # a class listed twice in one get_node_list
                sys.exit(f"{nid}: registered by {seen[nid]} and {path}")
            seen[nid] = path
            if path.startswith(API_DIR):
                reason = API
            elif nid in NODES:
                reason = NODES[nid]
            elif path in FILES:
                reason = FILES[path]
            else:
                sys.exit(f"{path}: not classified (add it to FILES in {sys.argv[0]})")
            for field in (nid, cat, reason or ""):
                if "\t" in field or "\n" in field:
                    sys.exit(f"{nid}: tab or newline in {field!r}")
            rows.append((nid, path, cat, "no" if reason else "yes", reason or ""))
    unused = set(NODES) - set(seen)
    if unused:
        sys.exit(f"NODES lists nodes ComfyUI does not register: {sorted(unused)}")
    out = sys.stdout
    out.write(f"# comfyui-version: {version}\n")
    out.write(f"# ComfyUI {version}'s built-in nodes (nodes.py, comfy_extras, comfy_api_nodes) and whether they apply\n")
    out.write("# to Stable Diffusion 1.x/2.x workflows. Written by scripts/comfyui_nodes.py from a ComfyUI checkout\n")
    out.write(f"# on {datetime.date.today().isoformat()}; the classification is by hand, in that script. Read by comfy/src/coverage.rs.\n")
    out.write("# Columns (tab-separated): node id, ComfyUI file, category, applicable (yes/no), reason when not.\n")
    out.write("id\tfile\tcategory\tapplicable\treason\n")
    for r in rows:
        out.write("\t".join(r) + "\n")
    sys.stderr.write(f"{len(rows)} nodes, {sum(r[3] == 'yes' for r in rows)} applicable\n")


if __name__ == "__main__":
    main()
