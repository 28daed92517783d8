//! Working out what a checkpoint is from its tensor names and shapes, as ComfyUI's `model_detection.py`
//! does, unless the file's metadata carries a `diffloom.config` (the project's tiny test models do).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::LoadError;
use crate::models::clip::{ClipConfig, ClipLayout};
use crate::models::unet::UnetConfig;
use crate::models::vae::VaeConfig;

/// Model families diffloom runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Sd1,
    Sd2,
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise (SD 1.x, SD 2.x base 512).
    Eps,
    /// The velocity (SD 2.x 768-v).
    V,
}

/// Everything needed to build the models of a checkpoint. Parts absent from the file are `None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub prediction: Prediction,
    pub unet: Option<UnetConfig>,
    pub vae: Option<VaeConfig>,
    pub clip: Option<ClipConfig>,
}

/// Checkpoint key prefixes of the three parts (single-file LDM layout).
pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// SD 1.x: transformers' CLIPTextModel under this prefix (some files lack the `text_model.` level).
pub const CLIP_HF_PREFIX: &str = "cond_stage_model.transformer.";
/// SD 2.x: OpenCLIP's text tower.
pub const CLIP_OPEN_PREFIX: &str = "cond_stage_model.model.";

/// The metadata key holding a [`ModelConfig`] as JSON.
pub const CONFIG_METADATA_KEY: &str = "diffloom.config";

/// Tensor shapes by name.
pub type Shapes = HashMap<String, Vec<i64>>;

/// Detects the configuration of a single-file checkpoint.
pub fn detect(file: &Path, shapes: &Shapes, metadata: &HashMap<String, String>) -> Result<ModelConfig, LoadError> {
    if let Some(json) = metadata.get(CONFIG_METADATA_KEY) {
        return serde_json::from_str(json).map_err(|e| LoadError::Corrupt {
            file: file.to_path_buf(),
            message: format!("metadata {CONFIG_METADATA_KEY:?} is not a valid model config: {e}"),
        });
    }
    if let Some(family) = unsupported_family(shapes) {
        return Err(LoadError::Unsupported {
            file: file.to_path_buf(),
            message: format!("not supported yet: this looks like {family} (diffloom runs SD 1.x and 2.x)"),
        });
    }
    let unet = detect_unet(shapes, UNET_PREFIX);
    let vae = detect_vae(shapes, VAE_PREFIX);
    let clip = detect_clip(shapes);
    // The text encoder decides (OpenCLIP is SD 2.x); without one, the UNet's context width does.
    let family = match (&clip, &unet) {
        (Some(c), _) if c.layout == ClipLayout::OpenClip => Family::Sd2,
        (Some(_), _) => Family::Sd1,
        (None, Some(u)) if u.context_dim == 1024 => Family::Sd2,
        (None, Some(_)) => Family::Sd1,
        (None, None) if vae.is_some() => Family::Sd1,
        (None, None) => {
            return Err(LoadError::Unsupported {
                file: file.to_path_buf(),
                message: "not a Stable Diffusion 1.x/2.x checkpoint: found no UNet, VAE or text encoder in the \
                          LDM layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)"
                    .into(),
            })
        }
    };
    let unet = unet.map(|mut u| {
        // Head layout is not visible in the shapes; the family spec has the released models' values.
        if let Some(heads) = family.spec().unet_heads {
            (u.num_heads, u.num_head_channels) = heads;
        }
        u
    });
    // A `v_pred` marker tensor is how some trainers flag v-prediction; SD 2.x files get ComfyUI's
    // heuristic in the loader (see `sd2_prediction`).
    let prediction = if shapes.contains_key("v_pred") { Prediction::V } else { Prediction::Eps };
    Ok(ModelConfig { family, prediction, unet, vae, clip })
}

/// Sets the prediction type by ComfyUI's SD 2.x heuristic, given the standard deviation of
/// `output_blocks.11.1.transformer_blocks.0.norm1.bias` (only the loader can compute it).
pub fn sd2_prediction(norm1_bias_std: f64) -> Prediction {
    if norm1_bias_std > 0.09 {
        Prediction::V
    } else {
        Prediction::Eps
    }
}

/// The key ComfyUI's SD 2.x v-prediction heuristic reads.
pub const SD2_V_PROBE: &str = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";

/// An SD 2.1 unCLIP checkpoint: its UNet's class-label input comes with the image encoder
/// (`embedder.model.visual.*`) or the noise augmentor (`noise_augmentor.*`) beside it.
pub fn is_unclip(shapes: &Shapes) -> bool {
    shapes.keys().any(|k| k.starts_with("embedder.model.visual.") || k.starts_with("noise_augmentor."))
}

fn unsupported_family(shapes: &Shapes) -> Option<&'static str> {
    let has = |k: &str| shapes.contains_key(k);
    let any = |p: &str| shapes.keys().any(|k| k.starts_with(p));
    if any("model.diffusion_model.double_blocks.") || any("double_blocks.") {
        Some("Flux")
    } else if any("model.diffusion_model.joint_blocks.") || any("joint_blocks.") {
        Some("Stable Diffusion 3")
    } else if any("conditioner.embedders.") || (has("model.diffusion_model.label_emb.0.0.weight") && !is_unclip(shapes)) {
        Some("SDXL")
    } else if any("model.diffusion_model.blocks.") && has("model.diffusion_model.x_embedder.proj.weight") {
        Some("a DiT-style model (PixArt/SD3-like)")
    } else if any("down_blocks.") && any("mid_block.") && !any(UNET_PREFIX) {
        Some("a diffusers-layout UNet file (pass the diffusers folder instead)")
    } else {
        None
    }
}

pub(crate) fn detect_unet(s: &Shapes, p: &str) -> Option<UnetConfig> {
    let get = |k: &str| s.get(&format!("{p}{k}"));
    let conv_in = get("input_blocks.0.0.weight")?;
    let (mc, in_channels) = (conv_in[0], conv_in[1]);
    let out_channels = get("out.2.weight").map_or(4, |w| w[0]);
    let mut channel_mult = Vec::new();
    let mut attention_resolutions = Vec::new();
    let mut res_per_level = Vec::new();
    let mut count = 0;
    let mut ds = 1;
    let mut level_ch = mc;
    let mut context_dim = 0;
    let mut use_linear = false;
    // Transformer depth per level (0 where a level has no attention).
    let mut depths = Vec::new();
    let mut level_depth = 0;
    for block in 1.. {
        if get(&format!("input_blocks.{block}.0.op.weight")).is_some() {
            channel_mult.push(level_ch / mc);
            res_per_level.push(count);
            depths.push(level_depth);
            level_depth = 0;
            count = 0;
            ds *= 2;
            continue;
        }
        let Some(out) = get(&format!("input_blocks.{block}.0.out_layers.3.weight")) else { break };
        level_ch = out[0];
        count += 1;
        if let Some(proj) = get(&format!("input_blocks.{block}.1.proj_in.weight")) {
            if !attention_resolutions.contains(&ds) {
                attention_resolutions.push(ds);
            }
            use_linear = proj.len() == 2;
            if let Some(k) = get(&format!("input_blocks.{block}.1.transformer_blocks.0.attn2.to_k.weight")) {
                context_dim = k[1];
            }
            level_depth = (0..).take_while(|t| get(&format!("input_blocks.{block}.1.transformer_blocks.{t}.norm1.weight")).is_some()).count() as i64;
        }
    }
    channel_mult.push(level_ch / mc);
    res_per_level.push(count);
    depths.push(level_depth);
    // One number when the attention levels agree (SD 1.x/2.x); levels without attention do not count.
    let attn_depths: Vec<i64> = depths.iter().copied().filter(|d| *d > 0).collect();
    let transformer_depth = match attn_depths.first() {
        Some(first) if attn_depths.iter().all(|d| d == first) => vec![*first],
        Some(_) => depths,
        None => vec![1],
    };
    let middle = (0..).take_while(|t| get(&format!("middle_block.1.transformer_blocks.{t}.norm1.weight")).is_some()).count() as i64;
    let adm_in_channels = get("label_emb.0.0.weight").map(|w| w[1]);
    // Largest first, as the LDM yaml configs list them.
    attention_resolutions.sort_unstable_by(|a, b| b.cmp(a));
    if context_dim == 0 {
        context_dim = get("middle_block.1.transformer_blocks.0.attn2.to_k.weight").map_or(768, |k| k[1]);
    }
    Some(UnetConfig {
        in_channels,
        out_channels,
        model_channels: mc,
        channel_mult,
        num_res_blocks: res_per_level.first().copied().unwrap_or(2),
        attention_resolutions,
        num_heads: 8,
        num_head_channels: -1,
        transformer_depth_middle: (middle > 0 && Some(&middle) != transformer_depth.last()).then_some(middle),
        transformer_depth,
        adm_in_channels,
        context_dim,
        use_linear_in_transformer: use_linear,
    })
}

fn detect_vae(s: &Shapes, p: &str) -> Option<VaeConfig> {
    let get = |k: &str| s.get(&format!("{p}{k}"));
    let conv_in = get("encoder.conv_in.weight").or_else(|| get("decoder.conv_in.weight"))?;
    let ch = get("encoder.conv_in.weight").map_or(128, |w| w[0]);
    let mut ch_mult = Vec::new();
    for i in 0.. {
        match get(&format!("encoder.down.{i}.block.0.conv1.weight")).or_else(|| get(&format!("decoder.up.{i}.block.0.conv1.weight"))) {
            Some(w) if get(&format!("encoder.down.{i}.block.0.conv1.weight")).is_some() => ch_mult.push(w[0] / ch),
            Some(w) => ch_mult.push(w[0] / ch),
            None => break,
        }
    }
    let num_res_blocks = (0..).take_while(|j| get(&format!("encoder.down.0.block.{j}.conv1.weight")).is_some()).count() as i64;
    let z_channels = get("decoder.conv_in.weight").map_or(conv_in[1], |w| w[1]);
    let embed_dim = get("post_quant_conv.weight").map_or(z_channels, |w| w[1]);
    Some(VaeConfig {
        ch,
        ch_mult,
        num_res_blocks: if num_res_blocks == 0 { 2 } else { num_res_blocks },
        z_channels,
        embed_dim,
        in_channels: get("encoder.conv_in.weight").map_or(3, |w| w[1]),
        out_ch: get("decoder.conv_out.weight").map_or(3, |w| w[0]),
    })
}

/// The text encoder's root prefix and config.
fn detect_clip(s: &Shapes) -> Option<ClipConfig> {
    let (layout, root) = clip_root(s)?;
    let get = |k: &str| s.get(&format!("{root}{k}"));
    let (tok, pos, layer) = match layout {
        ClipLayout::Hf => ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "encoder.layers."),
        ClipLayout::OpenClip => ("token_embedding.weight", "positional_embedding", "transformer.resblocks."),
    };
    let tok = get(tok)?;
    let (vocab_size, hidden_size) = (tok[0], tok[1]);
    let num_layers = (0..).take_while(|i| s.keys().any(|k| k.starts_with(&format!("{root}{layer}{i}.")))).count() as i64;
    let fc1 = match layout {
        ClipLayout::Hf => get("encoder.layers.0.mlp.fc1.weight"),
        ClipLayout::OpenClip => get("transformer.resblocks.0.mlp.c_fc.weight"),
    };
    Some(ClipConfig {
        vocab_size,
        hidden_size,
        num_layers,
        // Both released text encoders use 64-wide heads (ViT-L: 12 × 64, ViT-H: 16 × 64).
        num_heads: hidden_size / 64,
        intermediate_size: fc1.map_or(hidden_size * 4, |w| w[0]),
        max_position_embeddings: get(pos).map_or(77, |w| w[0]),
        hidden_act: if layout == ClipLayout::Hf { "quick_gelu".into() } else { "gelu".into() },
        layout,
        projection_dim: get("text_projection").map_or(hidden_size, |w| w[1]),
    })
}

/// Where the text encoder's weights start, and in which layout.
pub fn clip_root(s: &Shapes) -> Option<(ClipLayout, String)> {
    let hf_text = format!("{CLIP_HF_PREFIX}text_model.");
    if s.contains_key(&format!("{hf_text}embeddings.token_embedding.weight")) {
        Some((ClipLayout::Hf, hf_text))
    } else if s.contains_key(&format!("{CLIP_HF_PREFIX}embeddings.token_embedding.weight")) {
        Some((ClipLayout::Hf, CLIP_HF_PREFIX.to_owned()))
    } else if s.contains_key(&format!("{CLIP_OPEN_PREFIX}token_embedding.weight")) {
        Some((ClipLayout::OpenClip, CLIP_OPEN_PREFIX.to_owned()))
    } else {
        None
    }
}
