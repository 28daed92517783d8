//! Random-weight checkpoints in the real single-file key layout, for tests, the quick start and
//! benchmarks (no model hub is reachable). The model constructors themselves declare the tensors, so a
//! synthetic file has exactly the keys and shapes a real one has; the parity tests load these files
//! with diffusers' own converter, which catches a wrong layout.

use std::collections::HashMap;
use std::path::Path;

use diffloom_aten::Generator;
use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

use super::detect::{Family, ModelConfig, Prediction, CLIP_HF_PREFIX, CLIP_OPEN_PREFIX, CONFIG_METADATA_KEY, UNET_PREFIX, VAE_PREFIX};
use super::vision::{UNCLIP_VISION_PREFIX, VISION_CONFIG_METADATA_KEY};
use super::{keymap, LoadError, Loaded, Weights};
use crate::models::clip::{ClipConfig, ClipLayout, ClipTextModel};
use crate::models::clip_vision::{ClipVisionConfig, ClipVisionModel, CLIP_MEAN, CLIP_STD};
use crate::models::controlnet::{ControlNet, ControlNetConfig};
use crate::models::rrdbnet::{RrdbConfig, RrdbNet};
use crate::models::t2i_adapter::{AdapterConfig, AdapterKind, T2iAdapter};
use crate::models::unet::{Unet, UnetConfig};
use crate::models::vae::{AutoencoderKl, VaeConfig};

/// A random value for tensor `name`: weights scaled by 1/sqrt(fan-in) so activations stay O(1) through
/// the layers, norm scales near 1, small biases.
pub(crate) fn init(g: &mut Generator, name: &str, shape: &[i64], kind: Kind) -> Tensor {
    let t = g.randn_f32(shape);
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let is_norm = ["norm", "ln_", "layer_norm"].iter().any(|n| name.contains(n)) && shape.len() == 1;
    let t = if is_norm && leaf == "weight" {
        t * 0.1 + 1.0
    } else if shape.len() >= 2 && !name.contains("embedding") {
        let fan_in: i64 = shape[1..].iter().product();
        t / (fan_in as f64).sqrt()
    } else if name.contains("embedding") {
        t * 0.5
    } else {
        t * 0.1
    };
    t.to_kind(kind)
}

/// The tiny SD 1.x-style test model: full CLIP vocabulary (so real prompts work), narrow layers, and a
/// VAE with SD's ×8 downsampling.
pub fn tiny_config(family: Family, inpaint: bool) -> ModelConfig {
    let sd2 = family == Family::Sd2;
    ModelConfig {
        family,
        prediction: Prediction::Eps,
        unet: Some(UnetConfig {
            in_channels: if inpaint { 9 } else { 4 },
            out_channels: 4,
            // 64 and 128 channels: GroupNorm(32) then sees 2 and 4 channels per group. With one channel
            // per group the norm after the timestep projection would cancel it, hiding the timestep path.
            model_channels: 64,
            channel_mult: vec![1, 2],
            num_res_blocks: 1,
            attention_resolutions: vec![2, 1],
            num_heads: if sd2 { -1 } else { 2 },
            num_head_channels: if sd2 { 32 } else { -1 },
            transformer_depth: vec![1],
            transformer_depth_middle: None,
            adm_in_channels: None,
            context_dim: 32,
            use_linear_in_transformer: sd2,
        }),
        vae: Some(VaeConfig { ch: 32, ch_mult: vec![1, 1, 2, 2], num_res_blocks: 1, z_channels: 4, embed_dim: 4, in_channels: 3, out_ch: 3 }),
        clip: Some(ClipConfig {
            vocab_size: 49408,
            hidden_size: 32,
            num_layers: 3,
            num_heads: 2,
            intermediate_size: 64,
            max_position_embeddings: 77,
            hidden_act: if sd2 { "gelu".into() } else { "quick_gelu".into() },
            layout: if sd2 { ClipLayout::OpenClip } else { ClipLayout::Hf },
            projection_dim: 32,
        }),
    }
}

/// A tiny model whose configuration detection finds from the tensor shapes alone, as for a file without
/// diffloom's metadata (a pickle checkpoint): a 64-wide text encoder (one 64-wide head, as the released
/// encoders' heads are) and the family's released UNet head layout.
pub fn detectable_tiny_config(family: Family) -> ModelConfig {
    let mut c = tiny_config(family, false);
    if let Some(clip) = &mut c.clip {
        (clip.hidden_size, clip.intermediate_size, clip.projection_dim, clip.num_heads) = (64, 128, 64, 1);
    }
    if let Some(u) = &mut c.unet {
        u.context_dim = 64;
        // Detection's layout: 8 heads (SD 1.x), or the family's own (SD 2.x: 64-wide heads).
        (u.num_heads, u.num_head_channels) = family.spec().unet_heads.unwrap_or((8, -1));
    }
    c
}

/// The full-size configuration of a family (random weights, for benchmarks and the loading test).
pub fn full_config(family: Family) -> ModelConfig {
    let sd2 = family == Family::Sd2;
    ModelConfig {
        family,
        prediction: Prediction::Eps,
        unet: Some(if sd2 { UnetConfig::sd2() } else { UnetConfig::sd1() }),
        vae: Some(VaeConfig::sd()),
        clip: Some(if sd2 { ClipConfig::vit_h() } else { ClipConfig::vit_l() }),
    }
}

/// Writes a random-weight single-file checkpoint for `config` at `path` in `kind` (F32, Half or
/// BFloat16), seeded by `seed`. With `embed_config` the config goes into the metadata, as the tiny test
/// models need (their head counts cannot be detected); full-size files are detected like real ones.
pub fn write_checkpoint(path: &Path, config: &ModelConfig, kind: Kind, seed: i64, embed_config: bool) -> Result<(), LoadError> {
    let tensors = checkpoint_tensors(config, kind, seed);
    let metadata = embed_config.then(|| HashMap::from([(CONFIG_METADATA_KEY.to_owned(), serde_json::to_string(config).unwrap_or_default())]));
    write_safetensors(path, &tensors, metadata)
}

/// The tensors of [`write_checkpoint`]'s file, by stored name.
fn checkpoint_tensors(config: &ModelConfig, kind: Kind, seed: i64) -> Vec<(String, Tensor)> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut collect = |prefix: &str, w: Weights| {
        if let Some(made) = w.synthetic {
            tensors.extend(made.into_inner().made.into_iter().map(|(k, t)| (format!("{prefix}{k}"), t)));
        }
    };
    // Each part draws from its own generator, so adding a part keeps the others' weights.
    let seed = seed as u64;
    if let Some(c) = &config.unet {
        let w = Weights::synthetic(kind, seed);
        let _ = Unet::new(&w.root(), c.clone());
        collect(UNET_PREFIX, w);
    }
    if let Some(c) = &config.vae {
        let w = Weights::synthetic(kind, seed.wrapping_add(1));
        let _ = AutoencoderKl::new(&w.root(), c.clone());
        collect(VAE_PREFIX, w);
    }
    if let Some(c) = &config.clip {
        let w = Weights::synthetic(kind, seed.wrapping_add(2));
        let _ = ClipTextModel::new(&w.root(), c.clone());
        match c.layout {
            ClipLayout::Hf => collect(&format!("{CLIP_HF_PREFIX}text_model."), w),
            ClipLayout::OpenClip => {
                collect(CLIP_OPEN_PREFIX, w);
                // Present in real OpenCLIP checkpoints although SD does not use them.
                tensors.push((
                    format!("{CLIP_OPEN_PREFIX}text_projection"),
                    init(&mut Generator::cpu(seed.wrapping_add(3)), "text_projection", &[c.hidden_size, c.projection_dim], kind),
                ));
                tensors.push((format!("{CLIP_OPEN_PREFIX}logit_scale"), Tensor::from(4.6052f32).to_kind(kind)));
            }
        }
    }
    tensors
}

/// The tiny SD 2.1 unCLIP test model: the tiny SD2 model with a class-label (ADM) input twice as wide as
/// its image encoder's embeddings, and that image encoder, an OpenCLIP ViT (width 32, 3 layers, 4 heads,
/// 16-pixel input in 4-pixel patches, GELU, embeddings 24 wide).
pub fn tiny_unclip_config() -> (ModelConfig, ClipVisionConfig) {
    let vision = ClipVisionConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        patch_size: 4,
        image_size: 16,
        projection_dim: 24,
        hidden_act: "gelu".into(),
        image_mean: CLIP_MEAN,
        image_std: CLIP_STD,
    };
    let mut config = tiny_config(Family::Sd2, false);
    if let Some(u) = &mut config.unet {
        u.adm_in_channels = Some(2 * vision.projection_dim);
    }
    (config, vision)
}

/// Writes a random-weight SD 2.1 unCLIP checkpoint in the released files' layout: the SD2 parts, the
/// UNet's `label_emb.0.{0,2}`, the image encoder's OpenCLIP keys under `embedder.model.visual.`, and the
/// `noise_augmentor.*` buffers (its schedule, and random CLIP statistics `data_mean`/`data_std`, which
/// ComfyUI never loads). Both configs go into the metadata.
pub fn write_unclip_checkpoint(path: &Path, config: &ModelConfig, vision: &ClipVisionConfig, kind: Kind, seed: i64) -> Result<(), LoadError> {
    let mut tensors = checkpoint_tensors(config, kind, seed);
    let w = Weights::synthetic(kind, (seed as u64).wrapping_add(4));
    let _ = ClipVisionModel::open_clip(&w.root(), vision.clone());
    if let Some(made) = w.synthetic {
        tensors.extend(made.into_inner().made.into_iter().map(|(k, t)| (format!("{UNCLIP_VISION_PREFIX}{k}"), t)));
    }
    // register_schedule's buffers for the 1000-step squaredcos_cap_v2 schedule.
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    let betas: Vec<f64> = (0..1000).map(|i| (1.0 - alpha_bar((i + 1) as f64 / 1000.0) / alpha_bar(i as f64 / 1000.0)).min(0.999)).collect();
    let ac: Vec<f64> = betas
        .iter()
        .scan(1.0, |c, b| {
            *c *= 1.0 - b;
            Some(*c)
        })
        .collect();
    let prev: Vec<f64> = std::iter::once(1.0).chain(ac.iter().copied().take(999)).collect();
    let buffer = |f: &dyn Fn(usize) -> f64| Tensor::from_slice(&(0..1000).map(|i| f(i) as f32).collect::<Vec<_>>());
    let dim = vision.projection_dim;
    let mut g = Generator::cpu((seed as u64).wrapping_add(5));
    for (name, t) in [
        ("betas", buffer(&|i| betas[i])),
        ("alphas_cumprod", buffer(&|i| ac[i])),
        ("alphas_cumprod_prev", buffer(&|i| prev[i])),
        ("sqrt_alphas_cumprod", buffer(&|i| ac[i].sqrt())),
        ("sqrt_one_minus_alphas_cumprod", buffer(&|i| (1.0 - ac[i]).sqrt())),
        ("log_one_minus_alphas_cumprod", buffer(&|i| (1.0 - ac[i]).ln())),
        ("sqrt_recip_alphas_cumprod", buffer(&|i| (1.0 / ac[i]).sqrt())),
        ("sqrt_recipm1_alphas_cumprod", buffer(&|i| (1.0 / ac[i] - 1.0).sqrt())),
        ("data_mean", g.randn_f32(&[1, dim]) * 0.5),
        ("data_std", g.randn_f32(&[1, dim]).abs() + 0.5),
    ] {
        tensors.push((format!("noise_augmentor.{name}"), t.to_kind(kind)));
    }
    let metadata = HashMap::from([
        (CONFIG_METADATA_KEY.to_owned(), serde_json::to_string(config).unwrap_or_default()),
        (VISION_CONFIG_METADATA_KEY.to_owned(), serde_json::to_string(vision).unwrap_or_default()),
    ]);
    write_safetensors(path, &tensors, Some(metadata))
}

/// Writes `tensors` (f32, f16, bf16 or i64) to a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<(), LoadError> {
    let bytes = serialize(tensors, metadata).map_err(|message| LoadError::Io { file: path.to_path_buf(), message })?;
    std::fs::write(path, bytes).map_err(|e| LoadError::Io { file: path.to_path_buf(), message: e.to_string() })
}

/// `tensors` (f32, f16, bf16 or i64, any device) as the bytes of a safetensors file.
pub fn serialize(tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>, String> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Int64 => Dtype::I64,
            k => return Err(format!("cannot write {name}: unsupported kind {k:?}")),
        };
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel()).map_err(|e| e.to_string())?;
        buffers.push((name.clone(), dtype, t.size().iter().map(|d| *d as usize).collect::<Vec<_>>(), bytes));
    }
    let views: Vec<(String, TensorView)> =
        buffers.iter().map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v))).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    safetensors::serialize(views, metadata).map_err(|e| e.to_string())
}

/// Writes a random-weight RRDBNet upscaler: in Real-ESRGAN's key layout, or with `original_layout` in
/// the original ESRGAN one (`model.N…`), as community "4x-…" files have it.
pub fn write_rrdbnet(path: &Path, config: &RrdbConfig, original_layout: bool, seed: i64) -> Result<(), LoadError> {
    let w = Weights::synthetic(Kind::Float, seed as u64);
    let _ = RrdbNet::new(&w.root(), config.clone());
    let made = w.synthetic.map(|m| m.into_inner().made).unwrap_or_default();
    let tensors: Vec<(String, Tensor)> =
        made.into_iter().map(|(k, t)| (if original_layout { keymap::rrdbnet_original_key(&k, config) } else { k }, t)).collect();
    // The config rides along only so make-test-models can tell an up-to-date file; loading ignores it.
    let metadata = HashMap::from([(CONFIG_METADATA_KEY.to_owned(), serde_json::to_string(config).unwrap_or_default())]);
    write_safetensors(path, &tensors, Some(metadata))
}

/// Writes a random LoRA for a loaded UNet and text encoder in kohya's key layout (diffusers module
/// paths, `lora_down`/`lora_up`/`alpha`), covering what kohya's trainer covers with `conv_dim` set: every
/// linear and 1×1 layer of the transformers (rank `rank`, alpha `rank / 2`), the resnets' and samplers'
/// convolutions (3×3 ones as conv LoRA with rank `rank / 2`, alpha 1), the text encoder's attention
/// and MLP layers.
pub fn write_lora(path: &Path, unet: &Loaded<Unet>, clip: &Loaded<ClipTextModel>, rank: i64, seed: i64) -> Result<(), LoadError> {
    use crate::lora::{clip_modules, unet_modules};
    let mut g = Generator::cpu(seed as u64);
    let shapes: HashMap<&str, Vec<i64>> = unet.state.iter().chain(clip.state.iter()).map(|(k, t)| (k.as_str(), t.size())).collect();
    let mut tensors = Vec::new();
    let mut pair = |name: String, out: i64, inner: &[i64], rank: i64, alpha: f64| {
        let fan_in: i64 = inner.iter().product();
        let mut down_shape = vec![rank];
        down_shape.extend_from_slice(inner);
        let mut up_shape = vec![out, rank];
        if inner.len() == 3 {
            up_shape.extend([1, 1]);
        }
        let down = g.randn_f32(&down_shape) / (fan_in as f64).sqrt();
        let up = g.randn_f32(&up_shape) / (rank as f64).sqrt();
        tensors.push((format!("{name}.lora_down.weight"), down));
        tensors.push((format!("{name}.lora_up.weight"), up));
        tensors.push((format!("{name}.alpha"), Tensor::from(alpha as f32)));
    };
    for (module, ldm) in unet_modules(&unet.config, &unet.state) {
        // kohya trains neither conv_in/conv_out nor the timestep embedding.
        if !module.contains("blocks") && !module.starts_with("mid_block") {
            continue;
        }
        let Some(shape) = shapes.get(ldm.as_str()) else { continue };
        let name = format!("lora_unet_{}", module.replace('.', "_"));
        match shape.as_slice() {
            [out, inp, k, _] if *k > 1 => pair(name, *out, &shape[1..], (rank / 2).max(1), 1.0),
            [out, inp, ..] => pair(name, *out, if shape.len() == 4 { &shape[1..] } else { std::slice::from_ref(inp) }, rank, rank as f64 / 2.0),
            _ => {}
        }
    }
    for (module, target) in clip_modules(&clip.model) {
        let Some(shape) = shapes.get(target.key.as_str()) else { continue };
        let out = target.rows.map_or(shape[0], |(_, len)| len);
        pair(format!("lora_te_text_model_{}", module.replace('.', "_")), out, &shape[1..], rank, rank as f64 / 2.0);
    }
    write_safetensors(path, &tensors, None)
}

/// Writes a random-weight ControlNet in the original single-file layout (keys under
/// `control_model.`, as `control_v11p_sd15_canny.pth` has them), its config in the metadata (tiny head
/// layouts cannot be detected).
pub fn write_controlnet(path: &Path, config: &ControlNetConfig, kind: Kind, seed: i64) -> Result<(), LoadError> {
    let w = Weights::synthetic(kind, seed as u64);
    let _ = ControlNet::new(&w.root(), config.clone());
    let made = w.synthetic.map(|m| m.into_inner().made).unwrap_or_default();
    let tensors: Vec<(String, Tensor)> = made.into_iter().map(|(k, t)| (format!("control_model.{k}"), t)).collect();
    let metadata = HashMap::from([(CONFIG_METADATA_KEY.to_owned(), serde_json::to_string(config).unwrap_or_default())]);
    write_safetensors(path, &tensors, Some(metadata))
}

/// Writes a random-weight T2I-Adapter in TencentARC's original layout (full or light). Loading
/// detects everything from the shapes; the config rides along for make-test-models.
pub fn write_t2i_adapter(path: &Path, config: &AdapterConfig, seed: i64) -> Result<(), LoadError> {
    let w = Weights::synthetic(Kind::Float, seed as u64);
    let _ = T2iAdapter::new(&w.root(), config.clone());
    let made = w.synthetic.map(|m| m.into_inner().made).unwrap_or_default();
    let metadata = HashMap::from([(CONFIG_METADATA_KEY.to_owned(), serde_json::to_string(config).unwrap_or_default())]);
    write_safetensors(path, &made, Some(metadata))
}

/// The tiny SD 1.x model's ControlNet (RGB hints).
pub fn tiny_controlnet_config(unet: &UnetConfig) -> ControlNetConfig {
    ControlNetConfig { unet: UnetConfig { in_channels: 4, ..unet.clone() }, hint_channels: 3 }
}

/// A tiny model with SD 1.x's block layout (four levels, two res blocks each, 12 input blocks), which
/// T2I-Adapters assume: levels 32, 64, 128 and 128 wide.
pub fn tiny_four_level_config() -> ModelConfig {
    let mut c = tiny_config(Family::Sd1, false);
    if let Some(u) = &mut c.unet {
        (u.model_channels, u.channel_mult, u.num_res_blocks, u.attention_resolutions) = (32, vec![1, 2, 4, 4], 2, vec![4, 2, 1]);
    }
    c
}

/// Tiny T2I-Adapters for [`tiny_four_level_config`]: the full one (1×1 second convolutions, average
/// downsampling, grey-scale hints, as the released sketch and canny adapters) and the light one (RGB).
pub fn tiny_adapter_config(light: bool) -> AdapterConfig {
    let channels = vec![32, 64, 128, 128];
    if light {
        AdapterConfig { kind: AdapterKind::Light, cin: 192, channels, nums_rb: 4 }
    } else {
        // Grey-scale hints (64 = 1 × 8²), as the canny and sketch adapters take.
        AdapterConfig { kind: AdapterKind::Full { ksize: 1, use_conv: false }, cin: 64, channels, nums_rb: 2 }
    }
}

/// Writes a random-weight GLIGEN text-box model for a UNet of `unet`'s layout, in ComfyUI's GLIGEN file
/// layout (`position_net.*` and `<block>.<layer>.transformer_blocks.0.fuser.*` for each of the UNet's
/// spatial transformers), taking `width`-wide phrase embeddings (the text encoder's) and making
/// `width`-wide grounding tokens. The gates `alpha_attn` and `alpha_dense` are set well away from 0 (a
/// trained model's are; at 0 the fusers do nothing).
pub fn write_gligen(path: &Path, unet: &UnetConfig, width: i64, seed: i64) -> Result<(), LoadError> {
    use crate::models::gligen::Gligen;
    use crate::patches::BlockId;
    let layout_unet = Weights::synthetic(Kind::Float, 0);
    let sites = Unet::new(&layout_unet.root(), unet.clone()).transformer_sites();
    let layout: Vec<(String, i64)> = sites
        .iter()
        .map(|(block, layer, dim)| {
            let block = match block {
                BlockId::Input(i) => format!("input_blocks.{i}"),
                BlockId::Middle => "middle_block".to_owned(),
                BlockId::Output(i) => format!("output_blocks.{i}"),
            };
            (format!("{block}.{layer}.transformer_blocks.0.fuser"), *dim)
        })
        .collect();
    let w = Weights::synthetic(Kind::Float, seed as u64);
    let _ = Gligen::new(&w.root(), &layout, width, width);
    let made = w.synthetic.map(|m| m.into_inner().made).unwrap_or_default();
    let tensors: Vec<(String, Tensor)> = made
        .into_iter()
        .enumerate()
        .map(|(i, (k, t))| match k.rsplit('.').next() {
            Some("alpha_attn") | Some("alpha_dense") => (k, Tensor::from(0.4f32 + 0.05 * (i % 7) as f32)),
            _ => (k, t),
        })
        .collect();
    write_safetensors(path, &tensors, None)
}
