//! ComfyUI's `loaders` category: checkpoints, standalone VAEs, upscale models, CLIP vision and style
//! models.

use std::path::Path;
use std::rc::Rc;

use diffloom_core::value::MissingPart;
use diffloom_core::{Args, Combo, Ctx, Float, Handle, Locator, Node, NodeError, Schema, Str, Value, ValueType};

use crate::checkpoint::control::load_control;
use crate::checkpoint::load::{load_checkpoint, load_clip, load_unet, load_upscale_model, load_vae, CheckpointFile};
use crate::checkpoint::vision::{load_clip_vision, load_style_model, load_unclip_vision, UNCLIP_VISION_PREFIX};
use crate::control::ControlNetValue;
use crate::lora::apply_lora;
use crate::sd::{default_tokenizer, SdClip, SdModel, SdVae};

/// A token for a (possibly multi-GB) model file: its path, size and modification time, so that an
/// unchanged file is a cache hit without hashing it.
pub(super) fn file_stamp(files: &Locator, folder: &str, input: &str, literals: &Args) -> Result<Option<String>, NodeError> {
    let Some(Value::String(name)) = literals.get(input) else { return Ok(None) };
    let path = files.model(folder, input, name)?;
    let mut stamp = String::new();
    stamp_into(&path, Path::new(""), files.folders.content_keys, &mut stamp, 3).map_err(|e| NodeError::file(&path, e))?;
    Ok(Some(stamp))
}

/// Appends what identifies `path`'s contents, or each file's under it with its relative name (a
/// diffusers folder). With `content` (a disk cache is on), the BLAKE3 of the contents: a result cached
/// on disk is found again by any process or machine that has the same file, wherever it sits, and a
/// file replaced in place never passes for the old one. Reading a checkpoint for it costs about a
/// second per 2 GB (and leaves the file in the page cache for the load), once per file version per
/// process. Without, the file version: path, size, modification time, and on Unix device, inode and
/// change time, which no program can set back.
fn stamp_into(path: &Path, rel: &Path, content: bool, stamp: &mut String, depth: usize) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for e in entries {
            let rel = rel.join(e.file_name().unwrap_or_default());
            // Each entry under its path relative to the folder, so that no two layouts read alike.
            stamp.push_str(&format!("|{}", rel.display()));
            if depth > 0 || !e.is_dir() {
                stamp_into(&e, &rel, content, stamp, depth.saturating_sub(1))?;
            }
        }
    } else if meta.is_file() {
        let identity = if content { digest(path, &meta)? } else { format!("{}{:?}", path.display(), version(&meta)) };
        stamp.push_str(&format!("={identity}"));
    }
    Ok(())
}

/// A file version: size, modification time (ns) and, on Unix, device, inode and change time.
fn version(meta: &std::fs::Metadata) -> (u64, u128, [i64; 4]) {
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default().as_nanos();
    #[cfg(unix)]
    let more = {
        use std::os::unix::fs::MetadataExt;
        [meta.dev() as i64, meta.ino() as i64, meta.ctime(), meta.ctime_nsec()]
    };
    #[cfg(not(unix))]
    let more = [0i64; 4];
    (meta.len(), mtime, more)
}

/// The BLAKE3 (hex) of a file's contents, remembered per file version: path, size, modification
/// time and (on Unix) device, inode and change time, which no program can set back, so a file
/// rewritten in place with its size and time kept is hashed again.
fn digest(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<String> {
    type Memo = std::sync::Mutex<std::collections::HashMap<(std::path::PathBuf, (u64, u128, [i64; 4])), String>>;
    static MEMO: std::sync::LazyLock<Memo> = std::sync::LazyLock::new(Default::default);
    let key = (path.to_path_buf(), version(meta));
    if let Some(d) = MEMO.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(d);
    }
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    let d = h.finalize().to_hex().to_string();
    if let Ok(mut m) = MEMO.lock() {
        m.insert(key, d.clone());
    }
    Ok(d)
}

/// Peak resident memory of this process so far, from /proc (Linux), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Bytes as the reports show them: `1.23 GiB`.
pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

pub struct CheckpointLoaderSimple;
impl Node for CheckpointLoaderSimple {
    fn schema(&self) -> Schema {
        Schema::new("CheckpointLoaderSimple", "loaders")
            .describe("Loads an SD 1.x/2.x single-file .safetensors checkpoint (original LDM layout) or a diffusers folder.")
            .input("ckpt_name", Str::required())
            .doc("path to the .safetensors file or diffusers folder")
            .output("MODEL", ValueType::Model)
            .output("CLIP", ValueType::Clip)
            .output("VAE", ValueType::Vae)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "checkpoints", "ckpt_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("checkpoints", "ckpt_name", a.string("ckpt_name")?)?;
        checkpoint_values(cx, &path, None)
    }
}

/// ComfyUI's unCLIPCheckpointLoader: an SD 2.1 unCLIP checkpoint (sd21-unclip-l/h) with its image
/// encoder (`load_checkpoint_guess_config` with `output_clipvision`: the OpenCLIP ViT under
/// `embedder.model.visual.`).
pub struct UnClipCheckpointLoader;
impl Node for UnClipCheckpointLoader {
    fn schema(&self) -> Schema {
        Schema::new("unCLIPCheckpointLoader", "loaders")
            .describe("Loads an SD 2.1 unCLIP single-file checkpoint: the model, text encoder and VAE, and the image encoder unCLIPConditioning reads.")
            .input("ckpt_name", Str::required())
            .doc("path to the .safetensors file")
            .output("MODEL", ValueType::Model)
            .output("CLIP", ValueType::Clip)
            .output("VAE", ValueType::Vae)
            .output("CLIP_VISION", ValueType::ClipVision)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "checkpoints", "ckpt_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        use crate::checkpoint::detect::{is_unclip, UNET_PREFIX};
        let path = cx.files.model("checkpoints", "ckpt_name", a.string("ckpt_name")?)?;
        let not_unclip = |why: &str| {
            NodeError::input(
                "ckpt_name",
                format!("{}: not an SD 2.1 unCLIP checkpoint: {why} (load other checkpoints with CheckpointLoaderSimple)", path.display()),
            )
        };
        if path.is_dir() {
            return Err(not_unclip("a folder; unCLIP checkpoints are single files"));
        }
        let file = crate::checkpoint::safetensors::SafetensorsFile::open(&path).map_err(|e| NodeError::Failed(e.to_string()))?;
        let shapes: crate::checkpoint::detect::Shapes = file.tensors().iter().map(|(k, i)| (k.clone(), i.shape.clone())).collect();
        if !shapes.keys().any(|k| k.starts_with(UNCLIP_VISION_PREFIX)) {
            let why = if is_unclip(&shapes) { "it has a noise augmentor but no image encoder" } else { "no image encoder" };
            return Err(not_unclip(&format!("{why} under {UNCLIP_VISION_PREFIX}")));
        }
        if !shapes.contains_key(&format!("{UNET_PREFIX}label_emb.0.0.weight")) {
            return Err(not_unclip(&format!("its UNet has no class-label input ({UNET_PREFIX}label_emb.0.0.weight) for the image embedding")));
        }
        drop(file);
        let mut values = checkpoint_values(cx, &path, None)?;
        let (vision, bytes) = load_unclip_vision(&path, cx.device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
        let name = file_label(&path);
        let c = &vision.config;
        cx.messages.push(format!(
            "{name}: unCLIP image encoder, {} layers of width {}, {} px, image embeddings {} wide",
            c.num_hidden_layers, c.hidden_size, c.image_size, c.projection_dim
        ));
        values.push(Value::ClipVision(Handle::new(vision, bytes, format!("{name} (image encoder)"))));
        Ok(values)
    }
}

/// MODEL, CLIP and VAE of the checkpoint (file or diffusers folder) at `path`; `prediction` overrides
/// the detected one (CheckpointLoader's config file).
fn checkpoint_values(cx: &mut Ctx, path: &Path, prediction: Option<crate::checkpoint::detect::Prediction>) -> Result<Vec<Value>, NodeError> {
    if path.is_dir() {
        return folder_values(cx, path, prediction);
    }
    // A single file is opened now (header, detection) and each part is read when a node first uses
    // it: a graph without VAEDecode never reads the VAE, one whose conditioning is cached never reads
    // the text encoder.
    let file = Rc::new(CheckpointFile::open(path).map_err(|e| NodeError::Failed(e.to_string()))?);
    let mut config = file.config.clone();
    if let Some(p) = prediction {
        config.prediction = p;
    }
    let (device, kind, name) = (cx.device, cx.dtype, file_label(path));
    let (unet_bytes, clip_bytes, vae_bytes) = file.bytes_of_parts(kind);
    cx.messages.push(format!(
        "opened {} ({:?}, {:?}): {} of weights, each part read when first used",
        path.display(),
        config.family,
        config.prediction,
        gib((unet_bytes + clip_bytes + vae_bytes) as u64)
    ));
    let missing = |part: &str, keys: &str| Handle::new(MissingPart(format!("{} has no {part} ({keys})", path.display())), 0, format!("{name} (no {part})"));
    // Builds a part and notes it in the report of the node that needed it.
    fn timed<T>(what: String, load: impl FnOnce(&mut usize) -> Result<Option<T>, crate::checkpoint::LoadError>) -> Result<T, String> {
        let started = std::time::Instant::now();
        let mut bytes = 0;
        let part = load(&mut bytes).map_err(|e| e.to_string())?.ok_or_else(|| format!("{what}: the part is missing"))?;
        diffloom_core::exec::notes::note(format!(
            "loaded {what} in {:.2} s: {}, peak resident memory {}",
            started.elapsed().as_secs_f64(),
            gib(bytes as u64),
            peak_rss().map_or("unknown".into(), gib)
        ));
        Ok(part)
    }
    let model = if file.has_unet() {
        let (f, label, family, sampling) = (file.clone(), name.clone(), config.family, config.prediction.into());
        let what = format!("the UNet of {name}");
        Handle::lazy(
            move || {
                let unet = timed(what, |b| f.unet(device, kind, b))?;
                Ok(SdModel { unet, family, sampling, name: label, patches: Rc::default() })
            },
            unet_bytes,
            name.clone(),
        )
    } else {
        missing("UNet", "model.diffusion_model.*")
    };
    let clip = if file.has_clip() {
        let (f, family) = (file.clone(), config.family);
        let what = format!("the text encoder of {name}");
        Handle::lazy(
            move || {
                let model = timed(what, |b| f.clip(device, kind, b))?;
                Ok(SdClip { model, tokenizer: default_tokenizer()?, family, layer: None })
            },
            clip_bytes,
            name.clone(),
        )
    } else {
        missing("text encoder", "cond_stage_model.*")
    };
    let vae = if file.has_vae() {
        let f = file.clone();
        let what = format!("the VAE of {name}");
        Handle::lazy(move || Ok(SdVae { model: timed(what, |b| f.vae(device, kind, b))? }), vae_bytes, name.clone())
    } else {
        missing("VAE", "first_stage_model.*; load one with VAELoader")
    };
    Ok(vec![Value::Model(model), Value::Clip(clip), Value::Vae(vae)])
}

/// MODEL, CLIP and VAE of a diffusers folder, loaded at once.
fn folder_values(cx: &mut Ctx, path: &Path, prediction: Option<crate::checkpoint::detect::Prediction>) -> Result<Vec<Value>, NodeError> {
    let mut ck = load_checkpoint(path, cx.device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
    if let Some(p) = prediction {
        ck.config.prediction = p;
    }
    cx.messages.push(format!(
        "loaded {} ({:?}, {:?}) in {:.2} s: {} of weights, peak resident memory {}",
        path.display(),
        ck.config.family,
        ck.config.prediction,
        ck.load_time.as_secs_f64(),
        gib(ck.bytes as u64),
        peak_rss().map_or("unknown".into(), gib)
    ));
    let name = file_label(path);
    let missing = |part: &str, keys: &str| Handle::new(MissingPart(format!("{} has no {part} ({keys})", path.display())), 0, format!("{name} (no {part})"));
    let model = match &ck.unet {
        Some(unet) => Handle::new(
            SdModel { unet: unet.clone(), family: ck.config.family, sampling: ck.config.prediction.into(), name: name.clone(), patches: Rc::default() },
            ck.bytes,
            name.clone(),
        ),
        None => missing("UNet", "model.diffusion_model.*"),
    };
    let clip = match &ck.clip {
        Some(clip) => {
            let tokenizer = match &ck.tokenizer_dir {
                Some(dir) => Rc::new(crate::tokenizer::ClipTokenizer::from_dir(dir).map_err(NodeError::Failed)?),
                None => default_tokenizer().map_err(NodeError::Failed)?,
            };
            Handle::new(SdClip { model: clip.clone(), tokenizer, family: ck.config.family, layer: None }, 0, name.clone())
        }
        None => missing("text encoder", "cond_stage_model.*"),
    };
    let vae = match &ck.vae {
        Some(vae) => Handle::new(SdVae { model: vae.clone() }, 0, name.clone()),
        None => missing("VAE", "first_stage_model.*; load one with VAELoader"),
    };
    Ok(vec![Value::Model(model), Value::Clip(clip), Value::Vae(vae)])
}

/// ComfyUI's deprecated loader with an LDM yaml config: the file's parts are detected as
/// CheckpointLoaderSimple does; the config decides the prediction (`parameterization: "v"`).
pub struct CheckpointLoader;
impl Node for CheckpointLoader {
    fn schema(&self) -> Schema {
        Schema::new("CheckpointLoader", "advanced/loaders")
            .describe("Loads a checkpoint with an LDM yaml config (configs folder); the config's parameterization sets eps or v prediction.")
            .input("config_name", Str::required())
            .input("ckpt_name", Str::required())
            .output("MODEL", ValueType::Model)
            .output("CLIP", ValueType::Clip)
            .output("VAE", ValueType::Vae)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        let a = file_stamp(files, "configs", "config_name", literals)?;
        let b = file_stamp(files, "checkpoints", "ckpt_name", literals)?;
        Ok(Some(format!("{a:?}|{b:?}")))
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        use crate::checkpoint::detect::Prediction;
        let config = cx.files.model("configs", "config_name", a.string("config_name")?)?;
        let text = std::fs::read_to_string(&config).map_err(|e| NodeError::file(&config, e))?;
        // The only setting of an SD 1.x/2.x inference config the file's shapes do not tell.
        let v = text.lines().map(str::trim).any(|l| l.strip_prefix("parameterization:").is_some_and(|v| v.trim().trim_matches(['"', '\'']) == "v"));
        let path = cx.files.model("checkpoints", "ckpt_name", a.string("ckpt_name")?)?;
        checkpoint_values(cx, &path, Some(if v { Prediction::V } else { Prediction::Eps }))
    }
}

/// ComfyUI's DiffusersLoader: a diffusers pipeline folder from the `diffusers` models folder.
pub struct DiffusersLoader;
impl Node for DiffusersLoader {
    fn schema(&self) -> Schema {
        Schema::new("DiffusersLoader", "advanced/loaders/deprecated")
            .describe("Loads a diffusers pipeline folder (unet/, vae/, text_encoder/ with config.json each).")
            .input("model_path", Str::required())
            .output("MODEL", ValueType::Model)
            .output("CLIP", ValueType::Clip)
            .output("VAE", ValueType::Vae)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "diffusers", "model_path", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("diffusers", "model_path", a.string("model_path")?)?;
        if !crate::checkpoint::load::is_diffusers_folder(&path) {
            return Err(NodeError::input("model_path", format!("{} is not a diffusers pipeline folder (no model_index.json)", path.display())));
        }
        checkpoint_values(cx, &path, None)
    }
}

/// ComfyUI's UNETLoader: a UNet-only file from `diffusion_models` (or `unet`).
pub struct UNETLoader;
impl Node for UNETLoader {
    fn schema(&self) -> Schema {
        Schema::new("UNETLoader", "advanced/loaders")
            .describe("Loads a UNet-only .safetensors file (LDM or diffusers names); fp8 choices load in the run's dtype.")
            .input("unet_name", Str::required())
            .input("weight_dtype", Combo::of(&["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]))
            .output("MODEL", ValueType::Model)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "diffusion_models", "unet_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("diffusion_models", "unet_name", a.string("unet_name")?)?;
        let dtype = a.string("weight_dtype")?;
        if dtype != "default" {
            cx.messages.push(format!("weight_dtype {dtype}: diffloom keeps weights in the run's dtype ({:?}); fp8 storage is not supported", cx.dtype));
        }
        let (unet, family, prediction, bytes) = load_unet(&path, cx.device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
        let name = file_label(&path);
        cx.messages.push(format!("{name}: {family:?} UNet, {prediction:?} prediction"));
        let model = SdModel { unet, family, sampling: prediction.into(), name: name.clone(), patches: Rc::default() };
        Ok(vec![Value::Model(Handle::new(model, bytes, name))])
    }
}

/// The text-encoder recipes of ComfyUI's CLIPLoader; diffloom runs `stable_diffusion` (CLIP-L for
/// SD 1.x, OpenCLIP-H for SD 2.x).
const CLIP_TYPES: [&str; 18] = [
    "stable_diffusion",
    "stable_cascade",
    "sd3",
    "stable_audio",
    "mochi",
    "ltxv",
    "pixart",
    "cosmos",
    "lumina2",
    "wan",
    "hidream",
    "chroma",
    "ace",
    "omnigen2",
    "qwen_image",
    "hunyuan_image",
    "flux2",
    "ovis",
];

/// ComfyUI's CLIPLoader: a text encoder file from `text_encoders` (or `clip`).
pub struct CLIPLoader;
impl Node for CLIPLoader {
    fn schema(&self) -> Schema {
        Schema::new("CLIPLoader", "advanced/loaders")
            .describe("Loads a text encoder file (CLIP-L for SD 1.x, OpenCLIP-H for SD 2.x; transformers' or OpenCLIP's names).")
            .input("clip_name", Str::required())
            .input("type", Combo::of(&CLIP_TYPES))
            .optional("device", Combo::of(&["default", "cpu"]))
            .output("CLIP", ValueType::Clip)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "text_encoders", "clip_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let ty = a.string("type")?;
        if ty != "stable_diffusion" {
            return Err(NodeError::input("type", format!("{ty:?} text encoders are for model families diffloom does not run; use stable_diffusion")));
        }
        let path = cx.files.model("text_encoders", "clip_name", a.string("clip_name")?)?;
        let device = match a.get("device") {
            Some(Value::String(d)) if d == "cpu" => tch::Device::Cpu,
            _ => cx.device,
        };
        let (clip, family, bytes) = load_clip(&path, device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
        let name = file_label(&path);
        let tokenizer = default_tokenizer().map_err(NodeError::Failed)?;
        Ok(vec![Value::Clip(Handle::new(SdClip { model: clip, tokenizer, family, layer: None }, bytes, name))])
    }
}

pub struct VAELoader;
impl Node for VAELoader {
    fn schema(&self) -> Schema {
        Schema::new("VAELoader", "loaders")
            .describe("Loads a standalone VAE .safetensors file (keys with or without first_stage_model.).")
            .input("vae_name", Str::required())
            .output("VAE", ValueType::Vae)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "vae", "vae_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("vae", "vae_name", a.string("vae_name")?)?;
        let (vae, bytes) = load_vae(&path, cx.device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
        let name = file_label(&path);
        Ok(vec![Value::Vae(Handle::new(SdVae { model: vae }, bytes, name))])
    }
}

pub struct UpscaleModelLoader;
impl Node for UpscaleModelLoader {
    fn schema(&self) -> Schema {
        Schema::new("UpscaleModelLoader", "loaders")
            .describe("Loads an ESRGAN / Real-ESRGAN (RRDBNet) upscaler from .safetensors; layout, size and scale come from the keys.")
            .input("model_name", Str::required())
            .doc("path to the .safetensors file")
            .output("UPSCALE_MODEL", ValueType::UpscaleModel)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "upscale_models", "model_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("upscale_models", "model_name", a.string("model_name")?)?;
        // fp32 whatever --dtype says, as ComfyUI runs these: RRDBNet activations overflow fp16.
        let (model, bytes) = load_upscale_model(&path, cx.device, tch::Kind::Float).map_err(|e| NodeError::Failed(e.to_string()))?;
        let c = &model.config;
        let name = file_label(&path);
        cx.messages.push(format!("{name}: RRDBNet ×{} ({} blocks, {} features)", c.scale(), c.nb, c.nf));
        Ok(vec![Value::UpscaleModel(Handle::new(model, bytes, name))])
    }
}

/// Bytes of the tensors `new` holds that `old` does not share (what a patched copy costs).
fn patched_bytes(old: &[(String, tch::Tensor)], new: &[(String, tch::Tensor)]) -> usize {
    let shared: std::collections::HashSet<usize> = old.iter().map(|(_, t)| t.data_ptr() as usize).collect();
    new.iter().filter(|(_, t)| !shared.contains(&(t.data_ptr() as usize))).map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum()
}

/// The file name of `path`, for labels and reports.
fn file_label(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The LoRA node's output for one part: the patched copy when there is one, else the input as it was.
fn patched_value<T: 'static>(input: &Value, patched: Option<T>, bytes: impl FnOnce(&T) -> usize, lora: &Path) -> Value {
    let Some(p) = patched else { return input.clone() };
    let (bytes, label) = (bytes(&p), file_label(lora));
    match input {
        Value::Model(h) => Value::Model(Handle::new(p, bytes, format!("{} + {label}", h.label()))),
        Value::Clip(h) => Value::Clip(Handle::new(p, bytes, format!("{} + {label}", h.label()))),
        other => other.clone(),
    }
}

pub struct LoraLoader;
impl Node for LoraLoader {
    fn schema(&self) -> Schema {
        Schema::new("LoraLoader", "loaders")
            .describe("Applies a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) to the UNet and the text encoder, each with its own strength.")
            .input("model", ValueType::Model)
            .input("clip", ValueType::Clip)
            .input("lora_name", Str::required())
            .doc("path to the LoRA .safetensors file")
            .input("strength_model", Float::new(1.0).range(-100.0, 100.0).step(0.01))
            .input("strength_clip", Float::new(1.0).range(-100.0, 100.0).step(0.01))
            .output("MODEL", ValueType::Model)
            .output("CLIP", ValueType::Clip)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "loras", "lora_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (sm, sc) = (a.float("strength_model")?, a.float("strength_clip")?);
        let (model_in, clip_in) = (a.any("model")?, a.any("clip")?);
        if sm == 0.0 && sc == 0.0 {
            return Ok(vec![model_in.clone(), clip_in.clone()]);
        }
        // A part at strength 0 is passed through as it is (it may even be missing from the checkpoint).
        let model = if sm != 0.0 { Some((a.handle::<SdModel>("model")?, sm)) } else { None };
        let clip = if sc != 0.0 { Some((a.handle::<SdClip>("clip")?, sc)) } else { None };
        let path = cx.files.model("loras", "lora_name", a.string("lora_name")?)?;
        let (new_model, new_clip, messages) = apply_lora(&path, model, clip)?;
        cx.messages.extend(messages);
        Ok(vec![
            patched_value(model_in, new_model, |m| model.map_or(0, |(old, _)| patched_bytes(&old.unet.state, &m.unet.state)), &path),
            patched_value(clip_in, new_clip, |c| clip.map_or(0, |(old, _)| patched_bytes(&old.model.state, &c.model.state)), &path),
        ])
    }
}

pub struct LoraLoaderModelOnly;
impl Node for LoraLoaderModelOnly {
    fn schema(&self) -> Schema {
        Schema::new("LoraLoaderModelOnly", "loaders")
            .describe("Applies a LoRA's UNet part only.")
            .input("model", ValueType::Model)
            .input("lora_name", Str::required())
            .doc("path to the LoRA .safetensors file")
            .input("strength_model", Float::new(1.0).range(-100.0, 100.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "loras", "lora_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let sm = a.float("strength_model")?;
        let model_in = a.any("model")?;
        if sm == 0.0 {
            return Ok(vec![model_in.clone()]);
        }
        let model: &SdModel = a.handle("model")?;
        let path = cx.files.model("loras", "lora_name", a.string("lora_name")?)?;
        let (new_model, _, messages) = apply_lora(&path, Some((model, sm)), None)?;
        cx.messages.extend(messages);
        Ok(vec![patched_value(model_in, new_model, |m| patched_bytes(&model.unet.state, &m.unet.state), &path)])
    }
}

/// ComfyUI's `load_controlnet` turns on global average pooling for the shuffle ControlNet by its file
/// name.
fn shuffle_by_name(path: &Path) -> bool {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.ends_with("_shuffle") || stem.ends_with("_shuffle_fp16")
}

fn control_net_value(cx: &mut Ctx, path: &Path, base: Option<&SdModel>) -> Result<Vec<Value>, NodeError> {
    let (model, bytes) = load_control(path, cx.device, cx.dtype, base.map(|m| &m.unet)).map_err(|e| NodeError::Failed(e.to_string()))?;
    let name = file_label(path);
    cx.messages.push(format!("{name}: {}", model.describe()));
    let value = ControlNetValue { model: Rc::new(model), name: name.clone(), global_average_pooling: shuffle_by_name(path) };
    Ok(vec![Value::ControlNet(Handle::new(value, bytes, name))])
}

pub struct ControlNetLoader;
impl Node for ControlNetLoader {
    fn schema(&self) -> Schema {
        Schema::new("ControlNetLoader", "loaders")
            .describe(
                "Loads an SD 1.x/2.x ControlNet (original or diffusers layout, .safetensors or .pth) or a T2I-Adapter; \
                 what the file holds comes from its keys.",
            )
            .input("control_net_name", Str::required())
            .doc("path to the file in the controlnet (or t2i_adapter) folder")
            .output("CONTROL_NET", ValueType::ControlNet)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "controlnet", "control_net_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("controlnet", "control_net_name", a.string("control_net_name")?)?;
        control_net_value(cx, &path, None)
    }
}

pub struct DiffControlNetLoader;
impl Node for DiffControlNetLoader {
    fn schema(&self) -> Schema {
        Schema::new("DiffControlNetLoader", "loaders")
            .describe("Loads a \"diff\" ControlNet, whose weights are stored as differences to the model's (any ControlNet loads here too).")
            .input("model", ValueType::Model)
            .input("control_net_name", Str::required())
            .output("CONTROL_NET", ValueType::ControlNet)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "controlnet", "control_net_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let path = cx.files.model("controlnet", "control_net_name", a.string("control_net_name")?)?;
        control_net_value(cx, &path, Some(model))
    }
}

/// The hypernetwork as a cross-attention input patch: `k + hn_k(k)·strength`, `v + hn_v(v)·strength`
/// on the text states, for the widths it has.
struct HypernetworkPatch {
    net: crate::models::hypernetwork::Hypernetwork,
    strength: f64,
}

impl crate::patches::AttnInPatch for HypernetworkPatch {
    fn apply(
        &self,
        n: tch::Tensor,
        k: tch::Tensor,
        v: tch::Tensor,
        _cx: &crate::patches::AttnCx<'_>,
    ) -> Result<(tch::Tensor, tch::Tensor, tch::Tensor), NodeError> {
        let Some((hk, hv)) = self.net.by_width.get(k.size().last().unwrap_or(&0)) else { return Ok((n, k, v)) };
        let k2 = &k + hk.forward(&k) * self.strength;
        let v2 = &v + hv.forward(&v) * self.strength;
        Ok((n, k2, v2))
    }
}

pub struct HypernetworkLoader;
impl Node for HypernetworkLoader {
    fn schema(&self) -> Schema {
        Schema::new("HypernetworkLoader", "loaders")
            .describe("Applies a hypernetwork (A1111 .pt) to the model's cross-attention text states.")
            .input("model", ValueType::Model)
            .input("hypernetwork_name", Str::required())
            .input("strength", Float::new(1.0).range(-10.0, 10.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "hypernetworks", "hypernetwork_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let m: &SdModel = a.handle("model")?;
        let path = cx.files.model("hypernetworks", "hypernetwork_name", a.string("hypernetwork_name")?)?;
        let file = crate::checkpoint::safetensors::SafetensorsFile::open(&path).map_err(|e| NodeError::Failed(e.to_string()))?;
        let net = crate::models::hypernetwork::Hypernetwork::load(&file).map_err(|e| NodeError::Failed(e.to_string()))?;
        let widths: Vec<String> = net.by_width.keys().map(|w| w.to_string()).collect();
        cx.messages.push(format!("{}: hypernetwork for text states {} wide", file_label(&path), widths.join(", ")));
        let mut p = (*m.patches).clone();
        p.unet.attn2_patch.push(Rc::new(HypernetworkPatch { net, strength: a.float("strength")? }));
        let label = format!("{} + {}", m.name, file_label(&path));
        Ok(vec![Value::Model(Handle::new(SdModel { patches: Rc::new(p), ..m.clone() }, 0, label))])
    }
}

pub struct CLIPVisionLoader;
impl Node for CLIPVisionLoader {
    fn schema(&self) -> Schema {
        Schema::new("CLIPVisionLoader", "loaders")
            .describe("Loads a CLIP image encoder (transformers' CLIPVisionModelWithProjection layout: ViT-L/14, ViT-H/14, ViT-bigG/14).")
            .input("clip_name", Str::required())
            .doc("path to the file in the clip_vision folder")
            .output("CLIP_VISION", ValueType::ClipVision)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "clip_vision", "clip_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("clip_vision", "clip_name", a.string("clip_name")?)?;
        let (model, bytes) = load_clip_vision(&path, cx.device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
        let name = file_label(&path);
        let c = &model.config;
        cx.messages.push(format!(
            "{name}: CLIP vision, {} layers of width {}, {} px in {}-px patches, {} ({})",
            c.num_hidden_layers,
            c.hidden_size,
            c.image_size,
            c.patch_size,
            c.hidden_act,
            gib(bytes as u64)
        ));
        Ok(vec![Value::ClipVision(Handle::new(model, bytes, name))])
    }
}

pub struct StyleModelLoader;
impl Node for StyleModelLoader {
    fn schema(&self) -> Schema {
        Schema::new("StyleModelLoader", "loaders")
            .describe("Loads a T2I style adapter (t2iadapter_style_sd14v1), which turns a CLIP vision output into extra prompt tokens.")
            .input("style_model_name", Str::required())
            .doc("path to the file in the style_models folder")
            .output("STYLE_MODEL", ValueType::StyleModel)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(files, "style_models", "style_model_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("style_models", "style_model_name", a.string("style_model_name")?)?;
        // ComfyUI keeps the style model in float32 (it is not managed like the other models).
        let (model, bytes) = load_style_model(&path, cx.device, tch::Kind::Float).map_err(|e| NodeError::Failed(e.to_string()))?;
        let name = file_label(&path);
        let c = &model.config;
        cx.messages.push(format!("{name}: style adapter, {} tokens of width {} from vision states of width {}", c.num_token, c.context_dim, c.width));
        Ok(vec![Value::StyleModel(Handle::new(model, bytes, name))])
    }
}

#[cfg(test)]
#[path = "../tests/loaders.rs"]
mod tests;
