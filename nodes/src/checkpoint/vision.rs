//! Loading image encoders and style models: CLIP vision files (ComfyUI's `comfy/clip_vision.py`
//! `load`) and T2I style adapters (`comfy/sd.py` `load_style_model`), each recognised by its keys and
//! shapes as ComfyUI recognises it.

use std::path::Path;
use std::rc::Rc;

use tch::{Device, Kind};

use super::safetensors::SafetensorsFile;
use super::{LoadError, Weights};
use crate::models::clip_vision::{ClipVisionConfig, ClipVisionModel, CLIP_MEAN, CLIP_STD};
use crate::models::style_adapter::{StyleAdapter, StyleAdapterConfig};

/// Number of consecutive indices `i` for which `key(i)` is in the file.
fn count(file: &SafetensorsFile, key: impl Fn(usize) -> String) -> i64 {
    (0..).take_while(|i| file.info(&key(*i)).is_some()).count() as i64
}

/// A CLIP vision model in transformers' layout (`CLIPVisionModelWithProjection`, or a whole
/// `CLIPModel` whose text half is ignored) or in OpenCLIP's (`visual.*`, which ComfyUI converts), with
/// ComfyUI's configuration for its size: 48 layers ViT-bigG/14, 32 ViT-H/14, 24 ViT-L/14 (at 336
/// pixels when it has 577 positions). Other sizes, which ComfyUI refuses, load when a transformers
/// `config.json` (a `CLIPVisionConfig`, or a `CLIPConfig`'s `vision_config`) lies beside the file.
/// Returns the model and its size in bytes.
pub fn load_clip_vision(path: &Path, device: Device, kind: Kind) -> Result<(ClipVisionModel, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    // ComfyUI's `clip_vision.load`: an OpenCLIP file's keys are under `visual.`.
    let prefix = if file.info("visual.transformer.resblocks.0.attn.in_proj_weight").is_some() { "visual." } else { "" };
    let json = path.with_file_name("config.json");
    let beside = || std::fs::read_to_string(&json).ok().and_then(|text| config_from_json(&text));
    load_clip_vision_from(&file, path, prefix, beside, device, kind)
}

/// The key prefix of an SD 2.1 unCLIP checkpoint's image encoder (ComfyUI's `SD21UnclipL/H`
/// `clip_vision_prefix`), OpenCLIP's `VisionTransformer` keys.
pub const UNCLIP_VISION_PREFIX: &str = "embedder.model.visual.";

/// The metadata key of a checkpoint's image encoder config (JSON of [`ClipVisionConfig`]), which the
/// project's tiny unCLIP test models carry since their sizes cannot be recognised.
pub const VISION_CONFIG_METADATA_KEY: &str = "diffloom.clip_vision_config";

/// The image encoder of an SD 2.1 unCLIP checkpoint (ComfyUI's `load_checkpoint_guess_config` with
/// `output_clipvision`: `load_clipvision_from_sd(sd, "embedder.model.visual.", True)`).
pub fn load_unclip_vision(path: &Path, device: Device, kind: Kind) -> Result<(ClipVisionModel, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let from_metadata = || file.metadata.get(VISION_CONFIG_METADATA_KEY).and_then(|j| serde_json::from_str::<ClipVisionConfig>(j).ok());
    load_clip_vision_from(&file, path, UNCLIP_VISION_PREFIX, from_metadata, device, kind)
}

/// ComfyUI's `load_clipvision_from_sd` on the tensors of `file` under `prefix`: OpenCLIP's layout when
/// `{prefix}transformer.resblocks.0.attn.in_proj_weight` is there, transformers' otherwise. `fallback`
/// gives the config for a size ComfyUI does not recognise.
fn load_clip_vision_from(
    file: &Rc<SafetensorsFile>,
    path: &Path,
    prefix: &str,
    fallback: impl FnOnce() -> Option<ClipVisionConfig>,
    device: Device,
    kind: Kind,
) -> Result<(ClipVisionModel, usize), LoadError> {
    let unsupported = |message: String| LoadError::Unsupported { file: path.to_path_buf(), message };
    let has = |k: &str| file.info(&format!("{prefix}{k}")).is_some();
    let shape = |k: &str| file.info(&format!("{prefix}{k}")).map(|i| i.shape.clone()).unwrap_or_default();
    const LAYOUT: &str = "diffloom reads CLIP vision models in transformers' CLIPVisionModelWithProjection layout \
                          (vision_model.*, visual_projection.weight) or OpenCLIP's (visual.*)";
    let open_clip = has("transformer.resblocks.0.attn.in_proj_weight");
    // The names ComfyUI's conversion gives: (layer norm of layer i, position embedding).
    let (layer_key, positions_key): (Box<dyn Fn(usize) -> String>, &str) = if open_clip {
        (Box::new(|i| format!("{prefix}transformer.resblocks.{i}.ln_1.weight")), "positional_embedding")
    } else {
        (Box::new(|i| format!("{prefix}vision_model.encoder.layers.{i}.layer_norm1.weight")), "vision_model.embeddings.position_embedding.weight")
    };
    let has_layer = |i: usize| file.info(&layer_key(i)).is_some();
    if !open_clip {
        if file.tensors().keys().any(|k| k.starts_with(prefix) && k.contains("layer_scale2.lambda1")) {
            return Err(unsupported(format!("a DINOv2 image encoder, which diffloom does not run; {LAYOUT}")));
        }
        if !has_layer(0) {
            let what = if prefix.is_empty() {
                "not a CLIP vision model (no vision_model.encoder.layers.0.*)".to_owned()
            } else {
                format!("no image encoder under {prefix}")
            };
            return Err(unsupported(format!("{what}; {LAYOUT}")));
        }
    }
    let hidden = file.info(&layer_key(0)).and_then(|i| i.shape.first().copied()).unwrap_or(0);
    let layers = count(file, &layer_key);
    // ComfyUI's choice, in its order (`load_clipvision_from_sd`).
    let config = if has_layer(47) {
        ClipVisionConfig::vit_g()
    } else if has_layer(30) {
        ClipVisionConfig::vit_h()
    } else if has_layer(22) {
        if hidden == 1152 {
            return Err(unsupported(format!("a SigLIP image encoder, which diffloom does not run; {LAYOUT}")));
        }
        match shape(positions_key).first() {
            Some(577) => ClipVisionConfig::vit_l_336(),
            _ => ClipVisionConfig::vit_l(),
        }
    } else {
        fallback().ok_or_else(|| {
            unsupported(format!(
                "a CLIP vision model with {layers} layers of width {hidden}, a size ComfyUI does not recognise (ViT-L/14: 24 layers, \
                 ViT-H/14: 32, ViT-bigG/14: 48), and no transformers config.json (model_type \"clip_vision_model\") beside it"
            ))
        })?
    };
    if config.num_hidden_layers < 2 {
        return Err(unsupported(format!("{} layer(s): ComfyUI's CLIP vision output needs the penultimate layer", config.num_hidden_layers)));
    }
    if config.num_attention_heads < 1 || config.hidden_size % config.num_attention_heads != 0 || config.patch_size < 1 {
        return Err(unsupported(format!("config.json: {} heads do not divide the width {}", config.num_attention_heads, config.hidden_size)));
    }
    let w = Weights::from_prefix(file.clone(), prefix, device, kind);
    let model = if open_clip { ClipVisionModel::open_clip(&w.root(), config) } else { ClipVisionModel::new(&w.root(), config) };
    w.finish()?;
    Ok((model, w.loaded_bytes()))
}

/// The vision part of a transformers `config.json`: a `CLIPVisionConfig`, or a `CLIPConfig`'s
/// `vision_config`; transformers' defaults for what it leaves out.
fn config_from_json(text: &str) -> Option<ClipVisionConfig> {
    let root: serde_json::Value = serde_json::from_str(text).ok()?;
    let c = match root.get("model_type")?.as_str()? {
        "clip_vision_model" => &root,
        "clip" => root.get("vision_config")?,
        _ => return None,
    };
    let int = |k: &str, default: i64| c.get(k).and_then(|v| v.as_i64()).unwrap_or(default);
    let triple = |k: &str, default: [f64; 3]| {
        let v: Option<Vec<f64>> = c.get(k).and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|x| x.as_f64()).collect());
        v.and_then(|v| <[f64; 3]>::try_from(v).ok()).unwrap_or(default)
    };
    Some(ClipVisionConfig {
        hidden_size: int("hidden_size", 768),
        intermediate_size: int("intermediate_size", 3072),
        num_hidden_layers: int("num_hidden_layers", 12),
        num_attention_heads: int("num_attention_heads", 12),
        patch_size: int("patch_size", 32),
        image_size: int("image_size", 224),
        projection_dim: int("projection_dim", 512),
        hidden_act: c.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("quick_gelu").to_owned(),
        image_mean: triple("image_mean", CLIP_MEAN),
        image_std: triple("image_std", CLIP_STD),
    })
}

/// A T2I style adapter (`style_embedding` and the rest of `StyleAdapter`'s keys; `.pth` or
/// `.safetensors`). Its widths, token and layer counts come from the shapes (ComfyUI fixes them to
/// the one published file's: 1024, 768, 8 tokens, 3 layers); the head count is ComfyUI's 8. Flux Redux
/// files are refused by name. Returns the model and its size in bytes.
pub fn load_style_model(path: &Path, device: Device, kind: Kind) -> Result<(StyleAdapter, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let unsupported = |message: String| LoadError::Unsupported { file: path.to_path_buf(), message };
    let shape = |k: &str| file.info(k).map(|i| i.shape.clone());
    if shape("redux_down.weight").is_some() {
        return Err(unsupported("a Flux Redux style model, which diffloom does not run (it runs T2I style adapters for SD 1.x/2.x)".into()));
    }
    let Some(style) = shape("style_embedding") else {
        return Err(unsupported("not a style model: no \"style_embedding\" (T2I style adapter) or \"redux_down.weight\" (Flux Redux)".into()));
    };
    let proj = shape("proj").unwrap_or_default();
    let (&[1, num_token, width], &[_, context_dim]) = (style.as_slice(), proj.as_slice()) else {
        return Err(unsupported(format!("style_embedding has shape {style:?} and proj {proj:?}, expected [1, tokens, width] and [width, context]")));
    };
    let config =
        StyleAdapterConfig { width, context_dim, num_token, n_layes: count(&file, |i| format!("transformer_layes.{i}.ln_1.weight")), ..Default::default() };
    if width % config.num_head != 0 {
        return Err(unsupported(format!("width {width} is not a multiple of the adapter's {} heads", config.num_head)));
    }
    let w = Weights::from_prefix(file.clone(), "", device, kind);
    let model = StyleAdapter::new(&w.root(), config);
    w.finish()?;
    Ok((model, w.loaded_bytes()))
}
