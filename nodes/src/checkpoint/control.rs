//! Loading ControlNets and T2I-Adapters as ComfyUI's `load_controlnet` does: what a file holds is told
//! from its keys and shapes (the original `control_model.` layout with or without the prefix, diffusers'
//! layout, "diff" ControlNets, full and light adapters); models for other families are named and
//! refused.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use tch::{Device, Kind, Tensor};

use super::detect::{detect_unet, Family, Shapes, CONFIG_METADATA_KEY};
use super::safetensors::SafetensorsFile;
use super::{keymap, LoadError, Loaded, Weights};
use crate::models::controlnet::{ControlNet, ControlNetConfig};
use crate::models::t2i_adapter::{AdapterConfig, AdapterKind, T2iAdapter};
use crate::models::unet::Unet;

/// A loaded control model.
pub enum ControlModel {
    ControlNet(Rc<ControlNet>),
    Adapter(Rc<T2iAdapter>),
}

/// What was loaded, for messages.
impl ControlModel {
    pub fn describe(&self) -> String {
        match self {
            ControlModel::ControlNet(c) => {
                let u = &c.config.unet;
                format!("ControlNet ({}-wide text states, {} levels)", u.context_dim, u.channel_mult.len())
            }
            ControlModel::Adapter(a) => format!("T2I-Adapter ({:?}, {} hint channel(s))", a.config.kind, a.config.hint_channels()),
        }
    }
}

/// Families whose ControlNets diffloom does not run, told by a key only they have.
fn other_family(keys: &[String]) -> Option<&'static str> {
    let has = |k: &str| keys.iter().any(|x| x == k);
    let any = |p: &str| keys.iter().any(|x| x.starts_with(p) || x.contains(&format!(".{p}")));
    Some(if has("after_proj_list.18.bias") {
        "a HunyuanDiT ControlNet"
    } else if has("lora_controlnet") {
        "a Control-LoRA (Stability's SDXL control LoRAs)"
    } else if any("double_blocks.") || has("controlnet_x_embedder.weight") || has("controlnet_blocks.0.linear.weight") {
        "a Flux ControlNet"
    } else if has("pos_embed_input.proj.weight") || any("joint_blocks.") {
        "an SD3 ControlNet"
    } else if has("controlnet_blocks.0.weight") {
        "a DiT-family ControlNet (SD3, Flux or Qwen-Image)"
    } else if any("label_emb.0.0.") || has("add_embedding.linear_1.weight") {
        "an SDXL ControlNet"
    } else if any("backbone.") {
        "a Stable Cascade ControlNet"
    } else if has("style_embedding") {
        "a T2I style adapter (ComfyUI loads those with StyleModelLoader, which diffloom does not have)"
    } else {
        return None;
    })
}

/// Loads the ControlNet or T2I-Adapter in `path` onto `device` in `kind` (adapters in fp32, as ComfyUI
/// runs them in the latent's dtype). `diff_base` is DiffControlNetLoader's model: a "diff" ControlNet
/// (a `difference` marker) stores its weights minus that model's, and without one is an error.
pub fn load_control(path: &Path, device: Device, kind: Kind, diff_base: Option<&Loaded<Unet>>) -> Result<(ControlModel, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let unsupported = |message: String| LoadError::Unsupported { file: path.to_path_buf(), message };
    let keys: Vec<String> = file.tensors().keys().cloned().collect();
    if let Some(what) = other_family(&keys) {
        return Err(unsupported(format!("{what}; diffloom runs SD 1.x/2.x ControlNets and T2I-Adapters")));
    }
    let shape = |k: &str| file.info(k).map(|i| i.shape.clone());

    if keys.iter().any(|k| k == "controlnet_cond_embedding.conv_in.weight") {
        return load_diffusers_controlnet(path, file, device, kind);
    }
    let prefix = if keys.iter().any(|k| k == "control_model.zero_convs.0.0.weight") {
        "control_model."
    } else if keys.iter().any(|k| k == "zero_convs.0.0.weight") {
        ""
    } else {
        return load_adapter(path, file, device);
    };
    let config = match file.metadata.get(CONFIG_METADATA_KEY) {
        Some(json) => serde_json::from_str::<ControlNetConfig>(json).map_err(|e| LoadError::Corrupt {
            file: path.to_path_buf(),
            message: format!("metadata {CONFIG_METADATA_KEY:?} is not a ControlNet config: {e}"),
        })?,
        None => {
            let shapes: Shapes = keys.iter().filter_map(|k| Some((k.clone(), shape(k)?))).collect();
            let unet = detect_unet(&shapes, prefix).ok_or_else(|| unsupported(format!("no {prefix}input_blocks.0.0.weight: not a ControlNet")))?;
            ControlNetConfig { unet: with_family_heads(unet), hint_channels: shape(&format!("{prefix}input_hint_block.0.weight")).map_or(3, |s| s[1]) }
        }
    };
    let w = if keys.iter().any(|k| k == "difference") {
        let Some(base) = diff_base else {
            return Err(unsupported("a \"diff\" ControlNet (its weights are differences to a model's): load it with DiffControlNetLoader".into()));
        };
        diff_weights(&file, prefix, base, device, kind)?
    } else {
        Weights::from_prefix(file, prefix, device, kind)
    };
    let model = ControlNet::new(&w.root(), config);
    w.finish()?;
    Ok((ControlModel::ControlNet(Rc::new(model)), w.loaded_bytes()))
}

/// The head layout of the family the text-state width tells (it is not visible in the shapes):
/// 1024-wide states are SD 2.x's 64-wide heads, otherwise SD 1.x's 8 heads.
fn with_family_heads(mut unet: crate::models::unet::UnetConfig) -> crate::models::unet::UnetConfig {
    let family = if unet.context_dim == 1024 { Family::Sd2 } else { Family::Sd1 };
    if let Some(heads) = family.spec().unet_heads {
        (unet.num_heads, unet.num_head_channels) = heads;
    }
    unet
}

/// A diff ControlNet's weights: each stored tensor plus the model's tensor of the same name (ComfyUI
/// adds `diffusion_model.X` to `control_model.X` where the model has one).
fn diff_weights(file: &SafetensorsFile, prefix: &str, base: &Loaded<Unet>, device: Device, kind: Kind) -> Result<Weights, LoadError> {
    let model: HashMap<&str, &Tensor> = base.state.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut tensors = Vec::new();
    for key in file.tensors().keys() {
        let Some(name) = key.strip_prefix(prefix) else { continue };
        let info = file.info(key);
        if info.is_some_and(|i| !matches!(i.dtype, safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::F64)) {
            continue;
        }
        let t = file.load(key, device, Some(Kind::Float))?;
        let t = match model.get(name) {
            Some(m) if m.size() == t.size() => t + m.to_device(device).to_kind(Kind::Float),
            _ => t,
        };
        tensors.push((name.to_owned(), t.to_kind(kind)));
    }
    Ok(Weights::from_tensors(tensors, device, kind))
}

/// A diffusers-layout ControlNet (`diffusion_pytorch_model.safetensors`, with its `config.json`
/// beside it where there is one for the head layout), renamed to the original names.
fn load_diffusers_controlnet(path: &Path, file: Rc<SafetensorsFile>, device: Device, kind: Kind) -> Result<(ControlModel, usize), LoadError> {
    let keys: Vec<String> = file.tensors().keys().cloned().collect();
    let count = |p: &str| (0..).take_while(|i| keys.iter().any(|k| k.starts_with(&format!("{p}{i}.")))).count();
    let nrb = count("down_blocks.0.resnets.");
    let hint_blocks = count("controlnet_cond_embedding.blocks.");
    let index: HashMap<String, (usize, String)> = keys.iter().filter_map(|k| Some((keymap::controlnet_key(k, nrb, hint_blocks)?, (0, k.clone())))).collect();
    let shapes: Shapes = index.iter().filter_map(|(l, (_, k))| Some((l.clone(), file.info(k)?.shape.clone()))).collect();
    let unet = detect_unet(&shapes, "")
        .ok_or_else(|| LoadError::Unsupported { file: path.to_path_buf(), message: "a diffusers ControlNet without conv_in.weight".into() })?;
    let mut unet = with_family_heads(unet);
    if let Some(heads) = diffusers_heads(path, &unet)? {
        (unet.num_heads, unet.num_head_channels) = heads;
    }
    let config = ControlNetConfig { hint_channels: shapes.get("input_hint_block.0.weight").map_or(3, |s| s[1]), unet };
    let w = Weights::from_index(vec![file], index, device, kind);
    let model = ControlNet::new(&w.root(), config);
    w.finish()?;
    Ok((ControlModel::ControlNet(Rc::new(model)), w.loaded_bytes()))
}

/// `(num_heads, num_head_channels)` from the `config.json` beside a diffusers ControlNet:
/// `attention_head_dim` holds head counts in SD configs (one number, or one per level).
fn diffusers_heads(path: &Path, unet: &crate::models::unet::UnetConfig) -> Result<Option<(i64, i64)>, LoadError> {
    let config = path.with_file_name("config.json");
    let Ok(text) = std::fs::read_to_string(&config) else { return Ok(None) };
    let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Corrupt { file: config.clone(), message: format!("invalid JSON: {e}") })?;
    let heads = c.get("num_attention_heads").filter(|v| !v.is_null()).or_else(|| c.get("attention_head_dim")).cloned();
    Ok(match heads {
        Some(serde_json::Value::Array(per_level)) => {
            let widths: Vec<i64> =
                per_level.iter().zip(&unet.channel_mult).filter_map(|(h, m)| h.as_i64().map(|h| m * unet.model_channels / h.max(1))).collect();
            widths.first().map(|w| (-1, *w))
        }
        Some(v) => v.as_i64().map(|h| (h, -1)),
        None => None,
    })
}

/// A T2I-Adapter in the original layout (optionally nested under `adapter`) or diffusers'.
fn load_adapter(path: &Path, file: Rc<SafetensorsFile>, device: Device) -> Result<(ControlModel, usize), LoadError> {
    let keys: Vec<String> = file.tensors().keys().cloned().collect();
    let has = |k: &str| keys.iter().any(|x| x == k);
    let diffusers = has("adapter.body.0.resnets.0.block1.weight");
    let light_diffusers = diffusers && has("adapter.body.0.out_conv.weight");
    let nums_rb_diffusers = (0..).take_while(|j| has(&format!("adapter.body.0.resnets.{j}.block1.weight"))).count();
    // Logical (original) name → stored name.
    let index: HashMap<String, (usize, String)> = keys
        .iter()
        .filter_map(|k| {
            let logical =
                if diffusers { keymap::t2i_adapter_key(k, light_diffusers, nums_rb_diffusers)? } else { k.strip_prefix("adapter.").unwrap_or(k).to_owned() };
            Some((logical, (0, k.clone())))
        })
        .collect();
    let shape = |k: &str| index.get(k).and_then(|(_, s)| file.info(s)).map(|i| i.shape.clone());
    let count = |f: &dyn Fn(usize) -> String| (0..).take_while(|i| index.contains_key(&f(*i))).count();
    let config = if let Some(s) = shape("body.0.in_conv.weight").filter(|_| !index.contains_key("conv_in.weight")) {
        let levels = count(&|i| format!("body.{i}.out_conv.weight"));
        AdapterConfig {
            kind: AdapterKind::Light,
            cin: s[1],
            channels: (0..levels).filter_map(|i| shape(&format!("body.{i}.out_conv.weight")).map(|s| s[0])).collect(),
            nums_rb: count(&|j| format!("body.0.body.{j}.block1.weight")) as i64,
        }
    } else if let Some(s) = shape("conv_in.weight") {
        let (channel, cin) = (s[0], s[1]);
        if cin == 256 || cin == 768 {
            return Err(LoadError::Unsupported {
                file: path.to_path_buf(),
                message: "an SDXL T2I-Adapter; diffloom runs SD 1.x/2.x ControlNets and T2I-Adapters".into(),
            });
        }
        let blocks = count(&|i| format!("body.{i}.block1.weight"));
        AdapterConfig {
            kind: AdapterKind::Full {
                ksize: shape("body.0.block2.weight").map_or(1, |s| s[2]),
                use_conv: index.keys().any(|k| k.ends_with("down_opt.op.weight")),
            },
            cin,
            channels: vec![channel, channel * 2, channel * 4, channel * 4],
            nums_rb: (blocks / 4).max(1) as i64,
        }
    } else {
        return Err(LoadError::Unsupported {
            file: path.to_path_buf(),
            message: "neither a ControlNet (no zero_convs.0.0.weight or controlnet_cond_embedding) nor a T2I-Adapter (no conv_in or body.0.in_conv)".into(),
        });
    };
    let w = Weights::from_index(vec![file], index, device, Kind::Float);
    let model = T2iAdapter::new(&w.root(), config);
    w.finish()?;
    Ok((ControlModel::Adapter(Rc::new(model)), w.loaded_bytes()))
}
