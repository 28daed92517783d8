//! Loading a whole checkpoint: a single-file LDM `.safetensors` (or a standalone VAE file) into the
//! UNet, text encoder and VAE.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tch::{Device, Kind};

use super::detect::{self, ModelConfig, Prediction, Shapes};
use super::safetensors::SafetensorsFile;
use super::{keymap, LoadError, Loaded, WPath, Weights};
use crate::models::clip::ClipTextModel;
use crate::models::rrdbnet::{RrdbConfig, RrdbNet};
use crate::models::unet::Unet;
use crate::models::vae::AutoencoderKl;

/// The models of one checkpoint, shared by the nodes that use them.
pub struct Checkpoint {
    pub config: ModelConfig,
    pub unet: Option<Loaded<Unet>>,
    pub clip: Option<Loaded<ClipTextModel>>,
    pub vae: Option<Loaded<AutoencoderKl>>,
    /// Bytes of all loaded tensors in the target kind.
    pub bytes: usize,
    pub load_time: Duration,
    /// A diffusers folder's own `tokenizer/` (vocab.json, merges.txt).
    pub tokenizer_dir: Option<std::path::PathBuf>,
}

/// Builds a model from `w`, failing with every missing or misshapen tensor, and keeps its state.
pub(crate) fn build<M>(w: Weights, make: impl FnOnce(&WPath) -> M, bytes: &mut usize) -> Result<Loaded<M>, LoadError> {
    let model = make(&w.root());
    w.finish()?;
    *bytes += w.loaded_bytes();
    Ok(Loaded { model: Rc::new(model), state: Rc::new(w.into_state()) })
}

/// The shapes of every tensor in a file.
fn shapes(file: &SafetensorsFile) -> Shapes {
    file.tensors().iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect()
}

/// Loads a single-file checkpoint, or a diffusers folder, onto `device` in `kind`.
pub fn load_checkpoint(path: &Path, device: Device, kind: Kind) -> Result<Checkpoint, LoadError> {
    if path.is_dir() {
        if is_diffusers_folder(path) {
            return load_diffusers(path, device, kind);
        }
        return Err(LoadError::Unsupported {
            file: path.to_path_buf(),
            message: "is a directory but not a diffusers folder (no model_index.json or unet/config.json)".into(),
        });
    }
    let started = Instant::now();
    let file = CheckpointFile::open(path)?;
    let mut bytes = 0;
    let unet = file.unet(device, kind, &mut bytes)?;
    let clip = file.clip(device, kind, &mut bytes)?;
    let vae = file.vae(device, kind, &mut bytes)?;
    Ok(Checkpoint { config: file.config, unet, clip, vae, bytes, load_time: started.elapsed(), tokenizer_dir: None })
}

/// A single-file checkpoint opened (memory-mapped) and recognised, its parts not yet read: each is
/// built when asked for, so a graph that needs no VAE never reads the VAE's weights.
pub struct CheckpointFile {
    file: Rc<SafetensorsFile>,
    shapes: Shapes,
    pub config: ModelConfig,
}

impl CheckpointFile {
    /// Opens `path` and detects its family, parts and prediction type from the header.
    pub fn open(path: &Path) -> Result<CheckpointFile, LoadError> {
        let file = Rc::new(SafetensorsFile::open(path)?);
        let shapes = shapes(&file);
        let mut config = detect::detect(path, &shapes, &file.metadata)?;
        if config.family == detect::Family::Sd2 && config.prediction == Prediction::Eps && !file.metadata.contains_key(detect::CONFIG_METADATA_KEY) {
            if let Ok(bias) = file.load(detect::SD2_V_PROBE, Device::Cpu, Some(Kind::Float)) {
                config.prediction = detect::sd2_prediction(bias.std(false).double_value(&[]));
            }
        }
        Ok(CheckpointFile { file, shapes, config })
    }

    /// The text encoder's key prefix, when the file has one.
    fn clip_root(&self) -> Option<String> {
        self.config.clip.as_ref().and(detect::clip_root(&self.shapes)).map(|(_, root)| root)
    }

    /// Bytes the tensors under `prefix` take in `kind` (what loading them will hold).
    pub fn part_bytes(&self, prefix: &str, kind: Kind) -> usize {
        self.shapes.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, s)| s.iter().product::<i64>().max(0) as usize * kind.elt_size_in_bytes()).sum()
    }

    /// Bytes of the UNet, text encoder and VAE in `kind`, for parts the file has.
    pub fn bytes_of_parts(&self, kind: Kind) -> (usize, usize, usize) {
        let clip = self.clip_root().map_or(0, |root| self.part_bytes(&root, kind));
        (self.part_bytes(detect::UNET_PREFIX, kind), clip, self.part_bytes(detect::VAE_PREFIX, kind))
    }

    pub fn has_unet(&self) -> bool {
        self.config.unet.is_some()
    }

    pub fn has_clip(&self) -> bool {
        self.clip_root().is_some()
    }

    pub fn has_vae(&self) -> bool {
        self.config.vae.is_some()
    }

    pub fn unet(&self, device: Device, kind: Kind, bytes: &mut usize) -> Result<Option<Loaded<Unet>>, LoadError> {
        let Some(c) = &self.config.unet else { return Ok(None) };
        let w = Weights::from_prefix(self.file.clone(), detect::UNET_PREFIX, device, kind);
        Ok(Some(build(w, |p| Unet::new(p, c.clone()), bytes)?))
    }

    pub fn clip(&self, device: Device, kind: Kind, bytes: &mut usize) -> Result<Option<Loaded<ClipTextModel>>, LoadError> {
        let (Some(c), Some(root)) = (&self.config.clip, self.clip_root()) else { return Ok(None) };
        let w = Weights::from_prefix(self.file.clone(), &root, device, kind);
        Ok(Some(build(w, |p| ClipTextModel::new(p, c.clone()), bytes)?))
    }

    pub fn vae(&self, device: Device, kind: Kind, bytes: &mut usize) -> Result<Option<Loaded<AutoencoderKl>>, LoadError> {
        let Some(c) = &self.config.vae else { return Ok(None) };
        let w = Weights::from_prefix(self.file.clone(), detect::VAE_PREFIX, device, kind);
        Ok(Some(build(w, |p| AutoencoderKl::new(p, c.clone()), bytes)?))
    }
}

/// Loads a standalone VAE file: keys with or without the `first_stage_model.` prefix.
pub fn load_vae(path: &Path, device: Device, kind: Kind) -> Result<(Loaded<AutoencoderKl>, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let shapes = shapes(&file);
    let prefix = if shapes.keys().any(|k| k.starts_with(detect::VAE_PREFIX)) { detect::VAE_PREFIX } else { "" };
    let config = match file.metadata.get(detect::CONFIG_METADATA_KEY) {
        Some(_) => detect::detect(path, &shapes, &file.metadata)?.vae,
        None => {
            let prefixed: HashMap<String, Vec<i64>> =
                shapes.iter().map(|(k, v)| (format!("{}{}", detect::VAE_PREFIX, k.strip_prefix(prefix).unwrap_or(k)), v.clone())).collect();
            detect::detect(path, &prefixed, &HashMap::new()).ok().and_then(|c| c.vae)
        }
    };
    let config = config.ok_or_else(|| LoadError::Unsupported {
        file: path.to_path_buf(),
        message: "not a VAE: no encoder.conv_in / decoder.conv_in tensors in the LDM layout".into(),
    })?;
    let w = Weights::from_prefix(file, prefix, device, kind);
    let mut bytes = 0;
    let vae = build(w, |p| AutoencoderKl::new(p, config.clone()), &mut bytes)?;
    Ok((vae, bytes))
}

/// Loads a TAESD decoder (`taesd_decoder.safetensors`/`.pth` as released, or a diffusers
/// `AutoencoderTiny` file) for live previews, in fp32.
pub fn load_taesd(path: &Path, device: Device) -> Result<crate::models::taesd::TaesdDecoder, LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let diffusers = file.tensors().keys().any(|k| k.starts_with("decoder.layers."));
    let index: HashMap<String, (usize, String)> = file
        .tensors()
        .keys()
        .filter_map(|k| if diffusers { keymap::taesd_diffusers_key(k).map(|l| (l, (0, k.clone()))) } else { Some((k.clone(), (0, k.clone()))) })
        .collect();
    let w = Weights::from_index(vec![file], index, device, Kind::Float);
    let decoder = crate::models::taesd::TaesdDecoder::new(&w.root(), Default::default());
    w.finish()?;
    Ok(decoder)
}

/// Whether `dir` looks like a diffusers pipeline folder.
pub fn is_diffusers_folder(dir: &Path) -> bool {
    dir.join("model_index.json").is_file() || dir.join("unet").join("config.json").is_file()
}

fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Io { file: path.to_path_buf(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Corrupt { file: path.to_path_buf(), message: format!("invalid JSON: {e}") })
}

/// The weights file of a diffusers component folder (`diffusion_pytorch_model.safetensors`,
/// `model.safetensors`, or their `.fp16` variants).
fn component_weights(dir: &Path) -> Result<std::path::PathBuf, LoadError> {
    for name in ["diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let pickle = ["diffusion_pytorch_model.bin", "pytorch_model.bin"].iter().map(|n| dir.join(n)).find(|p| p.is_file());
    Err(match pickle {
        Some(p) => LoadError::Unsupported { file: p, message: "pickle weights are not loaded; save the folder with safe_serialization=True".into() },
        None => LoadError::Missing { file: dir.to_path_buf(), key: "diffusion_pytorch_model.safetensors or model.safetensors".into() },
    })
}

fn json_i64(v: &serde_json::Value, key: &str, file: &Path) -> Result<i64, LoadError> {
    v.get(key).and_then(|x| x.as_i64()).ok_or_else(|| LoadError::Corrupt { file: file.to_path_buf(), message: format!("no integer {key:?}") })
}

fn json_list(v: &serde_json::Value, key: &str, file: &Path) -> Result<Vec<serde_json::Value>, LoadError> {
    v.get(key).and_then(|x| x.as_array()).cloned().ok_or_else(|| LoadError::Corrupt { file: file.to_path_buf(), message: format!("no list {key:?}") })
}

/// Loads a diffusers folder (`unet/`, `vae/`, `text_encoder/`, with `config.json` each), renaming its
/// keys to the LDM names through `keymap`.
pub fn load_diffusers(dir: &Path, device: Device, kind: Kind) -> Result<Checkpoint, LoadError> {
    use crate::models::clip::{ClipConfig, ClipLayout};
    use crate::models::unet::UnetConfig;
    use crate::models::vae::VaeConfig;
    let started = Instant::now();
    let mut bytes = 0;

    let unet_dir = dir.join("unet");
    let (unet, unet_config) = if unet_dir.join("config.json").is_file() {
        let cfg_path = unet_dir.join("config.json");
        let c = read_json(&cfg_path)?;
        let boc: Vec<i64> = json_list(&c, "block_out_channels", &cfg_path)?.iter().filter_map(|x| x.as_i64()).collect();
        let down_types = json_list(&c, "down_block_types", &cfg_path)?;
        let up_types = json_list(&c, "up_block_types", &cfg_path)?;
        let nrb = json_i64(&c, "layers_per_block", &cfg_path)?;
        let mc = *boc.first().unwrap_or(&320);
        let crossattn = |t: &serde_json::Value| t.as_str().is_some_and(|s| s.starts_with("CrossAttn"));
        // `attention_head_dim` holds head *counts* in SD configs (8 for SD 1.x, [5, 10, 20, 20] for
        // SD 2.x, i.e. 64-wide heads); `num_attention_heads` overrides it where present.
        let heads = c.get("num_attention_heads").filter(|v| !v.is_null()).or_else(|| c.get("attention_head_dim")).cloned().unwrap_or(8.into());
        let (num_heads, num_head_channels) = match &heads {
            serde_json::Value::Array(per_level) => {
                let widths: Vec<i64> = per_level.iter().zip(&boc).filter_map(|(h, ch)| h.as_i64().map(|h| ch / h.max(1))).collect();
                if widths.windows(2).any(|w| w[0] != w[1]) {
                    return Err(LoadError::Unsupported { file: cfg_path, message: format!("per-level head widths {widths:?} differ") });
                }
                (-1, widths.first().copied().unwrap_or(64))
            }
            v => (v.as_i64().unwrap_or(8), -1),
        };
        let config = UnetConfig {
            in_channels: json_i64(&c, "in_channels", &cfg_path)?,
            out_channels: json_i64(&c, "out_channels", &cfg_path)?,
            model_channels: mc,
            channel_mult: boc.iter().map(|b| b / mc).collect(),
            num_res_blocks: nrb,
            attention_resolutions: down_types.iter().enumerate().filter(|(_, t)| crossattn(t)).map(|(i, _)| 1i64 << i).rev().collect(),
            num_heads,
            num_head_channels,
            transformer_depth: vec![transformer_depth(&c, &cfg_path)?],
            transformer_depth_middle: None,
            adm_in_channels: None,
            context_dim: json_i64(&c, "cross_attention_dim", &cfg_path)?,
            use_linear_in_transformer: c.get("use_linear_projection").and_then(|v| v.as_bool()).unwrap_or(false),
        };
        let up_has_attn: Vec<bool> = up_types.iter().map(crossattn).collect();
        let file = Rc::new(SafetensorsFile::open(&component_weights(&unet_dir)?)?);
        let index = file.tensors().keys().filter_map(|k| super::keymap::unet_key(k, nrb as usize, &up_has_attn).map(|l| (l, (0, k.clone())))).collect();
        let w = Weights::from_index(vec![file], index, device, kind);
        (Some(build(w, |p| Unet::new(p, config.clone()), &mut bytes)?), Some(config))
    } else {
        (None, None)
    };

    let vae_dir = dir.join("vae");
    let (vae, vae_config) = if vae_dir.join("config.json").is_file() {
        let cfg_path = vae_dir.join("config.json");
        let c = read_json(&cfg_path)?;
        let boc: Vec<i64> = json_list(&c, "block_out_channels", &cfg_path)?.iter().filter_map(|x| x.as_i64()).collect();
        let ch = *boc.first().unwrap_or(&128);
        let latent = json_i64(&c, "latent_channels", &cfg_path)?;
        let config = VaeConfig {
            ch,
            ch_mult: boc.iter().map(|b| b / ch).collect(),
            num_res_blocks: json_i64(&c, "layers_per_block", &cfg_path)?,
            z_channels: latent,
            embed_dim: latent,
            in_channels: json_i64(&c, "in_channels", &cfg_path)?,
            out_ch: json_i64(&c, "out_channels", &cfg_path)?,
        };
        let file = Rc::new(SafetensorsFile::open(&component_weights(&vae_dir)?)?);
        let levels = boc.len();
        let index = file.tensors().keys().filter_map(|k| super::keymap::vae_key(k, levels).map(|l| (l, (0, k.clone())))).collect();
        let w = Weights::from_index(vec![file], index, device, kind);
        (Some(build(w, |p| AutoencoderKl::new(p, config.clone()), &mut bytes)?), Some(config))
    } else {
        (None, None)
    };

    let te_dir = dir.join("text_encoder");
    let (clip, clip_config) = if te_dir.join("config.json").is_file() {
        let cfg_path = te_dir.join("config.json");
        let c = read_json(&cfg_path)?;
        let config = ClipConfig {
            vocab_size: json_i64(&c, "vocab_size", &cfg_path)?,
            hidden_size: json_i64(&c, "hidden_size", &cfg_path)?,
            num_layers: json_i64(&c, "num_hidden_layers", &cfg_path)?,
            num_heads: json_i64(&c, "num_attention_heads", &cfg_path)?,
            intermediate_size: json_i64(&c, "intermediate_size", &cfg_path)?,
            max_position_embeddings: json_i64(&c, "max_position_embeddings", &cfg_path)?,
            hidden_act: c.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("quick_gelu").to_owned(),
            layout: ClipLayout::Hf,
            projection_dim: c.get("projection_dim").and_then(|v| v.as_i64()).unwrap_or(768),
        };
        let file = Rc::new(SafetensorsFile::open(&component_weights(&te_dir)?)?);
        // transformers 4 saves `text_model.*`, transformers 5 drops that level.
        let index = file.tensors().keys().map(|k| (k.strip_prefix("text_model.").unwrap_or(k).to_owned(), (0, k.clone()))).collect();
        let w = Weights::from_index(vec![file], index, device, kind);
        (Some(build(w, |p| ClipTextModel::new(p, config.clone()), &mut bytes)?), Some(config))
    } else {
        (None, None)
    };

    if unet.is_none() && vae.is_none() && clip.is_none() {
        return Err(LoadError::Unsupported {
            file: dir.to_path_buf(),
            message: "a directory, but not a diffusers folder: no unet/, vae/ or text_encoder/ with a config.json".into(),
        });
    }
    // diffusers' SD 2.x text encoders are OpenCLIP converted to transformers' layout (1024 wide, GELU).
    let family = match (&clip_config, &unet_config) {
        (Some(c), _) if c.hidden_size == 1024 => detect::Family::Sd2,
        (None, Some(u)) if u.context_dim == 1024 => detect::Family::Sd2,
        _ => detect::Family::Sd1,
    };
    let scheduler = dir.join("scheduler").join("scheduler_config.json");
    let prediction = match read_json(&scheduler).ok().and_then(|s| s.get("prediction_type").and_then(|p| p.as_str().map(str::to_owned))) {
        Some(p) if p == "v_prediction" => Prediction::V,
        _ => Prediction::Eps,
    };
    let tokenizer = dir.join("tokenizer");
    Ok(Checkpoint {
        config: ModelConfig { family, prediction, unet: unet_config, vae: vae_config, clip: clip_config },
        unet,
        clip,
        vae,
        bytes,
        load_time: started.elapsed(),
        tokenizer_dir: tokenizer.join("vocab.json").is_file().then_some(tokenizer),
    })
}

/// Loads an ESRGAN-family upscaler (RRDBNet) from a `.safetensors` file in any of its key layouts
/// (Real-ESRGAN's `conv_first/body/…`, the original `model.N…`, BSRGAN's `RRDB_trunk…`; a `module.`
/// prefix from DataParallel training is dropped), detecting its size and scale from the shapes.
pub fn load_upscale_model(path: &Path, device: Device, kind: Kind) -> Result<(RrdbNet, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let stored: Vec<String> = file.tensors().keys().cloned().collect();
    let plain = |k: &str| k.strip_prefix("module.").unwrap_or(k).to_owned();
    let unsupported = |message: String| LoadError::Unsupported { file: path.to_path_buf(), message };
    if stored.iter().any(|k| k.contains("conv1x1")) {
        return Err(unsupported("an ESRGAN+ (\"plus\") RRDBNet with conv1x1 branches, which diffloom does not run".into()));
    }
    let old_layout = stored.iter().any(|k| plain(k) == "model.0.weight");
    let index: HashMap<String, (usize, String)> = if old_layout {
        let nb = (0..).take_while(|i| stored.iter().any(|k| plain(k).starts_with(&format!("model.1.sub.{i}.RDB1.")))).count();
        let last = stored.iter().filter_map(|k| plain(k).strip_prefix("model.")?.split('.').next()?.parse::<usize>().ok()).max().unwrap_or(0);
        let mut index = HashMap::new();
        for k in &stored {
            // As spandrel loads strictly: a key of no known layer means another architecture.
            let l = keymap::rrdbnet_old_layout_key(&plain(k), nb, last)
                .ok_or_else(|| unsupported(format!("not an upscale model diffloom runs: unexpected tensor {k:?} for an ESRGAN layout")))?;
            index.insert(l, (0, k.clone()));
        }
        index
    } else {
        stored.iter().map(|k| (keymap::rrdbnet_trunk_layout_key(&plain(k)), (0, k.clone()))).collect()
    };
    let shapes: Shapes = index.iter().filter_map(|(l, (_, k))| Some((l.clone(), file.info(k)?.shape.clone()))).collect();
    let config = RrdbConfig::detect(&shapes).map_err(|why| {
        unsupported(format!(
            "not an upscale model diffloom runs: {why} (ESRGAN/Real-ESRGAN RRDBNet .safetensors files are \
             supported; SwinIR, HAT, DAT, SPAN, … are not)"
        ))
    })?;
    let w = Weights::from_index(vec![file], index, device, kind);
    let model = RrdbNet::new(&w.root(), config);
    w.finish()?;
    Ok((model, w.loaded_bytes()))
}

/// A diffusers UNet config's `transformer_layers_per_block`: one depth for every level (a number, or
/// a list of equal numbers), 1 when absent. Per-level depths (SDXL's [1, 2, 10]) are an error naming
/// the file: SD 1.x/2.x UNets have one depth.
fn transformer_depth(c: &serde_json::Value, path: &Path) -> Result<i64, LoadError> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Depth {
        One(i64),
        PerLevel(Vec<i64>),
    }
    let bad = |message: String| LoadError::Unsupported { file: path.to_path_buf(), message };
    let Some(v) = c.get("transformer_layers_per_block").filter(|v| !v.is_null()) else { return Ok(1) };
    match serde_json::from_value::<Depth>(v.clone()) {
        Ok(Depth::One(d)) => Ok(d),
        Ok(Depth::PerLevel(levels)) => match levels.first() {
            Some(first) if levels.iter().all(|l| l == first) => Ok(*first),
            _ => Err(bad(format!("transformer_layers_per_block {levels:?}: per-level transformer depths (an SDXL-style UNet) are not supported"))),
        },
        Err(_) => Err(bad(format!("transformer_layers_per_block {v} is neither a number nor a list of numbers"))),
    }
}

/// Loads a standalone UNet file (UNETLoader: `diffusion_models/`): LDM names bare or under
/// `model.diffusion_model.`, or diffusers' names. The configuration comes from the shapes (or the
/// `diffloom.config` metadata), the family from the text-state width, and an SD 2.x file's
/// prediction from ComfyUI's heuristic.
pub fn load_unet(path: &Path, device: Device, kind: Kind) -> Result<(Loaded<Unet>, detect::Family, Prediction, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let stored: Vec<String> = file.tensors().keys().cloned().collect();
    let unsupported = |message: &str| LoadError::Unsupported { file: path.to_path_buf(), message: message.to_owned() };
    let has = |k: &str| stored.iter().any(|s| s == k);
    // Logical (LDM) name → stored name.
    let index: HashMap<String, (usize, String)> = if has("conv_in.weight") && stored.iter().any(|k| k.starts_with("down_blocks.")) {
        let nrb = (0..).take_while(|j| stored.iter().any(|k| k.starts_with(&format!("down_blocks.0.resnets.{j}.")))).count();
        let ups = (0..).take_while(|i| stored.iter().any(|k| k.starts_with(&format!("up_blocks.{i}.")))).count();
        let up_has_attn: Vec<bool> = (0..ups).map(|i| stored.iter().any(|k| k.starts_with(&format!("up_blocks.{i}.attentions.")))).collect();
        stored.iter().filter_map(|k| Some((keymap::unet_key(k, nrb, &up_has_attn)?, (0, k.clone())))).collect()
    } else {
        let prefix = if stored.iter().any(|k| k.starts_with(detect::UNET_PREFIX)) { detect::UNET_PREFIX } else { "" };
        stored.iter().filter_map(|k| Some((k.strip_prefix(prefix)?.to_owned(), (0, k.clone())))).collect()
    };
    let shapes: Shapes = index.iter().filter_map(|(l, (_, k))| Some((l.clone(), file.info(k)?.shape.clone()))).collect();
    if shapes.contains_key("label_emb.0.0.weight") || shapes.keys().any(|k| k.starts_with("double_blocks.") || k.starts_with("joint_blocks.")) {
        return Err(unsupported("not an SD 1.x/2.x UNet (SDXL, SD3 or Flux); diffloom runs SD 1.x and 2.x"));
    }
    let (config, family, mut prediction) = match file.metadata.get(detect::CONFIG_METADATA_KEY) {
        Some(_) => {
            let c = detect::detect(path, &HashMap::new(), &file.metadata)?;
            (c.unet.ok_or_else(|| unsupported("its metadata describes no UNet"))?, c.family, c.prediction)
        }
        None => {
            let mut u = detect::detect_unet(&shapes, "").ok_or_else(|| unsupported("no input_blocks.0.0.weight (or conv_in.weight): not a UNet"))?;
            let family = if u.context_dim == 1024 { detect::Family::Sd2 } else { detect::Family::Sd1 };
            if let Some(heads) = family.spec().unet_heads {
                (u.num_heads, u.num_head_channels) = heads;
            }
            (u, family, Prediction::Eps)
        }
    };
    let probe = "output_blocks.11.1.transformer_blocks.0.norm1.bias";
    if family == detect::Family::Sd2 && !file.metadata.contains_key(detect::CONFIG_METADATA_KEY) {
        if let Some((_, stored)) = index.get(probe) {
            if let Ok(bias) = file.load(stored, Device::Cpu, Some(Kind::Float)) {
                prediction = detect::sd2_prediction(bias.std(false).double_value(&[]));
            }
        }
    }
    let mut bytes = 0;
    let w = Weights::from_index(vec![file], index, device, kind);
    let unet = build(w, |p| Unet::new(p, config.clone()), &mut bytes)?;
    Ok((unet, family, prediction, bytes))
}

/// Loads a standalone text encoder (CLIPLoader: `text_encoders/`): transformers' CLIPTextModel (with or
/// without `text_model.`, or under `cond_stage_model.transformer.`) or OpenCLIP's text tower (under
/// `cond_stage_model.model.`, or bare). 1024-wide encoders are SD 2.x's.
pub fn load_clip(path: &Path, device: Device, kind: Kind) -> Result<(Loaded<ClipTextModel>, detect::Family, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let stored: Vec<String> = file.tensors().keys().cloned().collect();
    // Put the names under a checkpoint's prefix, so the checkpoint detection reads them.
    let open_clip = stored.iter().any(|k| k.contains("transformer.resblocks."));
    let to_ckpt = |k: &str| -> String {
        if k.starts_with("cond_stage_model.") {
            k.to_owned()
        } else if open_clip {
            format!("{}{}", detect::CLIP_OPEN_PREFIX, k.strip_prefix("model.").unwrap_or(k))
        } else {
            format!("{}text_model.{}", detect::CLIP_HF_PREFIX, k.strip_prefix("text_model.").unwrap_or(k))
        }
    };
    let shapes: Shapes = stored.iter().filter_map(|k| Some((to_ckpt(k), file.info(k)?.shape.clone()))).collect();
    let config = detect::detect(path, &shapes, &file.metadata)?;
    let clip_config = config.clip.ok_or_else(|| LoadError::Unsupported {
        file: path.to_path_buf(),
        message: "not a CLIP text encoder (no token embedding in transformers' or OpenCLIP's layout)".into(),
    })?;
    let (_, root) = detect::clip_root(&shapes).ok_or_else(|| LoadError::Unsupported { file: path.to_path_buf(), message: "no text encoder root".into() })?;
    let family =
        if clip_config.layout == crate::models::clip::ClipLayout::OpenClip || clip_config.hidden_size == 1024 { detect::Family::Sd2 } else { config.family };
    let index: HashMap<String, (usize, String)> = stored.iter().filter_map(|k| Some((to_ckpt(k).strip_prefix(&root)?.to_owned(), (0, k.clone())))).collect();
    let mut bytes = 0;
    let w = Weights::from_index(vec![file], index, device, kind);
    let clip = build(w, |p| ClipTextModel::new(p, clip_config.clone()), &mut bytes)?;
    Ok((clip, family, bytes))
}
