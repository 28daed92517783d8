//! ComfyUI's `loaders` category: checkpoints, standalone VAEs, upscale models.

use std::path::Path;
use std::rc::Rc;

use diffloom_core::{Args, Ctx, Handle, Node, NodeError, Schema, Str, Value, ValueType};

use crate::checkpoint::load::{load_checkpoint, load_upscale_model, load_vae};
use crate::sd::{default_tokenizer, SdClip, SdModel, SdVae};

/// Stands in for a part the checkpoint lacks; a node that needs it says why it is missing.
pub struct MissingPart(pub String);

/// A token for a (possibly multi-GB) model file: its path, size and modification time, so that an
/// unchanged file is a cache hit without hashing it.
fn file_stamp(graph_dir: &Path, input: &str, literals: &Args) -> Result<Option<String>, NodeError> {
    let Some(Value::String(path)) = literals.get(input) else { return Ok(None) };
    let path = diffloom_core::node::resolve_input_path(graph_dir, input, path)?;
    let mut stamp = path.display().to_string();
    stamp_into(&path, &mut stamp, 3).map_err(|e| NodeError::file(&path, e))?;
    Ok(Some(stamp))
}

/// Appends size and modification time of `path`, and of the files under it (a diffusers folder).
fn stamp_into(path: &Path, stamp: &mut String, depth: usize) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() && depth > 0 {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for e in entries {
            stamp.push_str(&format!("|{}", e.display()));
            stamp_into(&e, stamp, depth - 1)?;
        }
    } else {
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
        stamp.push_str(&format!("|{}|{}", meta.len(), mtime.as_nanos()));
    }
    Ok(())
}

/// Peak resident memory of this process so far, from /proc (Linux), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

fn gib(bytes: u64) -> String {
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
    fn change_token(&self, graph_dir: &Path, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(graph_dir, "ckpt_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.input_path("ckpt_name", a.string("ckpt_name")?)?;
        let _guard = tch::no_grad_guard();
        let ck = load_checkpoint(&path, cx.device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
        cx.messages.push(format!(
            "loaded {} ({:?}, {:?}) in {:.2} s: {} of weights, peak resident memory {}",
            path.display(),
            ck.config.family,
            ck.config.prediction,
            ck.load_time.as_secs_f64(),
            gib(ck.bytes as u64),
            peak_rss().map_or("unknown".into(), gib)
        ));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let missing = |part: &str, keys: &str| {
            Handle::new(MissingPart(format!("{} has no {part} ({keys})", path.display())), 0, format!("{name} (no {part})"))
        };
        let model = match &ck.unet {
            Some(unet) => Handle::new(
                SdModel { unet: unet.clone(), family: ck.config.family, prediction: ck.config.prediction },
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
}

pub struct VAELoader;
impl Node for VAELoader {
    fn schema(&self) -> Schema {
        Schema::new("VAELoader", "loaders")
            .describe("Loads a standalone VAE .safetensors file (keys with or without first_stage_model.).")
            .input("vae_name", Str::required())
            .output("VAE", ValueType::Vae)
    }
    fn change_token(&self, graph_dir: &Path, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(graph_dir, "vae_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.input_path("vae_name", a.string("vae_name")?)?;
        let _guard = tch::no_grad_guard();
        let (vae, bytes) = load_vae(&path, cx.device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(vec![Value::Vae(Handle::new(SdVae { model: Rc::new(vae) }, bytes, name))])
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
    fn change_token(&self, graph_dir: &Path, literals: &Args) -> Result<Option<String>, NodeError> {
        file_stamp(graph_dir, "model_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.input_path("model_name", a.string("model_name")?)?;
        let _guard = tch::no_grad_guard();
        // fp32 whatever --dtype says, as ComfyUI runs these: RRDBNet activations overflow fp16.
        let (model, bytes) = load_upscale_model(&path, cx.device, tch::Kind::Float).map_err(|e| NodeError::Failed(e.to_string()))?;
        let c = &model.config;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        cx.messages.push(format!("{name}: RRDBNet ×{} ({} blocks, {} features)", c.scale(), c.nb, c.nf));
        Ok(vec![Value::UpscaleModel(Handle::new(model, bytes, name))])
    }
}

/// The SD part behind a handle input, or an error naming the input and why the part is absent.
pub fn part<'a, T: 'static>(a: &'a Args, input: &str) -> Result<&'a T, NodeError> {
    let handle = match a.any(input)? {
        Value::Model(h) | Value::Clip(h) | Value::Vae(h) | Value::UpscaleModel(h) => h,
        v => return Err(NodeError::input(input, format!("expected a model handle, got {}", v.value_type()))),
    };
    handle.downcast::<T>().ok_or_else(|| match handle.downcast::<MissingPart>() {
        Some(MissingPart(why)) => NodeError::input(input, why.clone()),
        None => NodeError::input(input, format!("{} is not a Stable Diffusion model part", handle.label())),
    })
}
