//! ComfyUI's display names of the nodes diffloom shares with it (`NODE_DISPLAY_NAME_MAPPINGS` and the
//! newer schemas' `display_name`, ComfyUI 0.8): what the canvas shows, and the default titles in its
//! API exports. Nodes not listed are shown by their type name.

const DISPLAY_NAMES: &[(&str, &str)] = &[
    ("CLIPSetLastLayer", "CLIP Set Last Layer"),
    ("CLIPTextEncode", "CLIP Text Encode (Prompt)"),
    ("CheckpointLoaderSimple", "Load Checkpoint"),
    ("ConditioningCombine", "Conditioning (Combine)"),
    ("ConditioningConcat", "Conditioning (Concat)"),
    ("ConditioningSetArea", "Conditioning (Set Area)"),
    ("ConditioningSetAreaPercentage", "Conditioning (Set Area with Percentage)"),
    ("ConditioningSetMask", "Conditioning (Set Mask)"),
    ("EmptyLatentImage", "Empty Latent Image"),
    ("GrowMask", "Grow Mask"),
    ("ImageBlend", "Image Blend"),
    ("ImageInvert", "Invert Image"),
    ("ImagePadForOutpaint", "Pad Image for Outpainting"),
    ("ImageScale", "Upscale Image"),
    ("ImageScaleBy", "Upscale Image By"),
    ("ImageToMask", "Convert Image to Mask"),
    ("ImageUpscaleWithModel", "Upscale Image (using Model)"),
    ("KSamplerAdvanced", "KSampler (Advanced)"),
    ("LatentComposite", "Latent Composite"),
    ("LatentFromBatch", "Latent From Batch"),
    ("LatentUpscale", "Upscale Latent"),
    ("LatentUpscaleBy", "Upscale Latent By"),
    ("LoadImage", "Load Image"),
    ("LoadImageMask", "Load Image (as Mask)"),
    ("LoraLoader", "Load LoRA"),
    ("MaskToImage", "Convert Mask to Image"),
    ("PreviewAny", "Preview as Text"),
    ("PreviewImage", "Preview Image"),
    ("PrimitiveBoolean", "Boolean"),
    ("PrimitiveFloat", "Float"),
    ("PrimitiveInt", "Int"),
    ("PrimitiveString", "String"),
    ("PrimitiveStringMultiline", "String (Multiline)"),
    ("RepeatLatentBatch", "Repeat Latent Batch"),
    ("SamplerEulerAncestralCFGPP", "SamplerEulerAncestralCFG++"),
    ("SamplerEulerCFGpp", "SamplerEulerCFG++"),
    ("SaveImage", "Save Image"),
    ("SetLatentNoiseMask", "Set Latent Noise Mask"),
    ("StringConcatenate", "Concatenate"),
    ("UpscaleModelLoader", "Load Upscale Model"),
    ("ControlNetLoader", "Load ControlNet Model"),
    ("DiffControlNetLoader", "Load ControlNet Model (diff)"),
    ("ControlNetApply", "Apply ControlNet (OLD)"),
    ("ControlNetApplyAdvanced", "Apply ControlNet"),
    ("Morphology", "ImageMorphology"),
    ("VAEDecode", "VAE Decode"),
    ("VAEDecodeTiled", "VAE Decode (Tiled)"),
    ("VAEEncode", "VAE Encode"),
    ("VAEEncodeForInpaint", "VAE Encode (for Inpainting)"),
    ("VAEEncodeTiled", "VAE Encode (Tiled)"),
    ("VAELoader", "Load VAE"),
];

/// The name ComfyUI shows for node type `node`.
pub fn display_name(node: &str) -> &str {
    DISPLAY_NAMES.iter().find(|(n, _)| *n == node).map_or(node, |(_, d)| d)
}

/// Whether `title` is the title ComfyUI gives a node of type `node` by default (not the user's own).
pub fn is_default_title(node: &str, title: &str) -> bool {
    title == node || title == display_name(node)
}
