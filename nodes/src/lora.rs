//! LoRA files (kohya / A1111, and the diffusers/PEFT naming) applied to the UNet and the text encoder.
//!
//! A LoRA never changes the model it is applied to: the patched weights are new tensors
//! (`W + strength · alpha/rank · up @ down`, computed in fp32 and rounded once, as ComfyUI does), and the
//! weights it does not touch are shared with the original. So two LoRA nodes on one checkpoint, or one
//! node re-run with another strength, never compound.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use tch::{Device, Kind, Tensor};

use diffloom_core::NodeError;

use crate::checkpoint::load::build;
use crate::checkpoint::safetensors::SafetensorsFile;
use crate::checkpoint::{keymap, LoadError, Loaded, Weights};
use crate::models::clip::{ClipLayout, ClipTextModel};
use crate::models::unet::{Unet, UnetConfig};
use crate::sd::{SdClip, SdModel};

/// One low-rank pair: `delta = up.flatten(1) @ down.flatten(1)`, scaled by `alpha / rank`.
pub struct LoraModule {
    /// The key without its suffix (`lora_unet_down_blocks_0_…_to_q`).
    pub name: String,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
}

/// A full difference for one weight (`.diff`) or bias (`.diff_b`), as ComfyUI's LoraSave writes them.
pub struct DiffModule {
    /// The key without its suffix.
    pub name: String,
    pub delta: Tensor,
    pub bias: bool,
}

/// A LoRA file's modules, and the keys diffloom cannot apply (with why).
pub struct LoraFile {
    pub modules: Vec<LoraModule>,
    pub diffs: Vec<DiffModule>,
    pub unsupported: Vec<(String, &'static str)>,
}

/// (down, up) suffixes: kohya's, PEFT's (`lora_A`/`lora_B`), older diffusers'.
const PAIRS: [(&str, &str); 3] = [(".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight")];

/// What an unusable key belongs to, for the report.
fn unsupported_kind(key: &str) -> &'static str {
    let kinds = [
        (".hada_", "LoHa"),
        (".lokr_", "LoKr"),
        (".lora_mid.", "LoCon Tucker (lora_mid)"),
        (".dora_scale", "DoRA scale (applied as a plain LoRA)"),
        (".oft_", "OFT"),
        (".a1.weight", "GLoRA"),
        (".diff", "full weight difference"),
        (".w_norm", "norm difference"),
        (".set_weight", "weight replacement"),
    ];
    kinds.iter().find(|(m, _)| key.contains(m)).map_or("unknown key", |(_, k)| k)
}

impl LoraFile {
    pub fn open(path: &Path) -> Result<LoraFile, LoadError> {
        let file = SafetensorsFile::open(path)?;
        let mut keys: Vec<&String> = file.tensors().keys().collect();
        keys.sort();
        let present: HashSet<&str> = keys.iter().map(|k| k.as_str()).collect();
        // Modules with a Tucker middle matrix cannot be applied as a plain pair.
        let tucker: HashSet<&str> = keys.iter().filter_map(|k| k.strip_suffix(".lora_mid.weight")).collect();
        let mut used = HashSet::new();
        let mut modules = Vec::new();
        let mut unsupported = Vec::new();
        for key in &keys {
            for (down_suffix, up_suffix) in PAIRS {
                let Some(base) = key.strip_suffix(down_suffix) else { continue };
                let up_key = format!("{base}{up_suffix}");
                if !present.contains(up_key.as_str()) {
                    continue;
                }
                let alpha_key = format!("{base}.alpha");
                used.extend([key.to_string(), up_key.clone(), alpha_key.clone()]);
                if tucker.contains(base) {
                    unsupported.extend([key.to_string(), up_key].map(|k| (k, "LoCon Tucker (lora_mid)")));
                    continue;
                }
                let load = |k: &str| file.load(k, Device::Cpu, Some(Kind::Float));
                let (down, up) = (load(key)?, load(&up_key)?);
                let alpha = match present.contains(alpha_key.as_str()) {
                    true => Some(load(&alpha_key)?),
                    false => None,
                };
                // up [out, rank(, 1, 1)] after down [rank, in(, kh, kw)]; alpha one number.
                let (ds, us) = (down.size(), up.size());
                let fits = ds.len() >= 2 && us.len() >= 2 && us[1] == ds[0] && us[2..].iter().all(|d| *d == 1);
                if !fits || alpha.as_ref().is_some_and(|a| a.numel() != 1) {
                    unsupported.push((key.to_string(), "malformed pair: up and down shapes do not chain, or alpha is not one number"));
                    continue;
                }
                let alpha = alpha.map(|a| a.double_value(&[])).or_else(|| peft_alpha(&file.metadata, base));
                modules.push(LoraModule { name: base.to_owned(), down, up, alpha });
            }
        }
        let mut diffs = Vec::new();
        for key in &keys {
            let (name, bias) = match (key.strip_suffix(".diff"), key.strip_suffix(".diff_b")) {
                (Some(n), _) => (n, false),
                (_, Some(n)) => (n, true),
                _ => continue,
            };
            used.insert(key.to_string());
            diffs.push(DiffModule { name: name.to_owned(), delta: file.load(key, Device::Cpu, Some(Kind::Float))?, bias });
        }
        unsupported.extend(keys.iter().filter(|k| !used.contains(k.as_str())).map(|k| (k.to_string(), unsupported_kind(k))));
        Ok(LoraFile { modules, diffs, unsupported })
    }
}

/// The alpha of module `name` (`unet.<path>` / `text_encoder.<path>`) in a diffusers/PEFT file, which
/// keeps them in its `lora_adapter_metadata` (per component: `lora_alpha`, and `alpha_pattern` for the
/// modules that differ, keyed by module path or a dotted suffix of it, as PEFT matches them).
fn peft_alpha(metadata: &HashMap<String, String>, name: &str) -> Option<f64> {
    let meta: serde_json::Value = serde_json::from_str(metadata.get("lora_adapter_metadata")?).ok()?;
    let (component, path) = name.split_once('.')?;
    let pattern = meta.get(format!("{component}.alpha_pattern")).and_then(|p| p.as_object());
    let matched = pattern.and_then(|p| p.iter().find(|(k, _)| path == k.as_str() || path.ends_with(&format!(".{k}")))).and_then(|(_, v)| v.as_f64());
    matched.or_else(|| meta.get(format!("{component}.lora_alpha"))?.as_f64())
}

/// The weight a LoRA module patches: a logical tensor name, optionally a block of its rows (OpenCLIP's
/// stacked q/k/v projection).
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub key: String,
    pub rows: Option<(i64, i64)>,
}

impl Target {
    fn whole(key: String) -> Target {
        Target { key, rows: None }
    }
}

fn has(state: &[(String, Tensor)]) -> HashSet<&str> {
    state.iter().map(|(k, _)| k.as_str()).collect()
}

/// The diffusers module paths of an SD UNet (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`)
/// with the LDM weight each is stored as, for the modules this UNet has.
pub fn unet_modules(config: &UnetConfig, state: &[(String, Tensor)]) -> Vec<(String, String)> {
    let keys = has(state);
    let nrb = config.num_res_blocks as usize;
    let levels = config.channel_mult.len();
    let up_has_attn: Vec<bool> = (0..levels).map(|i| keys.contains(format!("output_blocks.{}.1.proj_in.weight", i * (nrb + 1)).as_str())).collect();
    let resnet = |p: &str| ["conv1", "conv2", "time_emb_proj", "conv_shortcut"].map(|l| format!("{p}.{l}")).to_vec();
    let attention = |p: &str| {
        let mut m = vec![format!("{p}.proj_in"), format!("{p}.proj_out")];
        // The deepest level's count covers every level; paths a level lacks are filtered out below.
        let depth = config.transformer_depth.iter().copied().chain(config.transformer_depth_middle).max().unwrap_or(1);
        for k in 0..depth {
            let t = format!("{p}.transformer_blocks.{k}");
            for a in ["attn1", "attn2"] {
                m.extend(["to_q", "to_k", "to_v", "to_out.0"].map(|l| format!("{t}.{a}.{l}")));
            }
            m.extend([format!("{t}.ff.net.0.proj"), format!("{t}.ff.net.2")]);
        }
        m
    };
    let mut paths: Vec<String> = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"].map(String::from).to_vec();
    for i in 0..levels {
        for j in 0..=nrb {
            for block in ["down_blocks", "up_blocks"] {
                paths.extend(resnet(&format!("{block}.{i}.resnets.{j}")));
                paths.extend(attention(&format!("{block}.{i}.attentions.{j}")));
            }
        }
        paths.push(format!("down_blocks.{i}.downsamplers.0.conv"));
        paths.push(format!("up_blocks.{i}.upsamplers.0.conv"));
    }
    for j in 0..2 {
        paths.extend(resnet(&format!("mid_block.resnets.{j}")));
    }
    paths.extend(attention("mid_block.attentions.0"));
    paths
        .into_iter()
        .filter_map(|p| {
            let ldm = keymap::unet_key(&format!("{p}.weight"), nrb, &up_has_attn)?;
            keys.contains(ldm.as_str()).then_some((p, ldm))
        })
        .collect()
}

/// The transformers-layout module paths of a CLIP text encoder (`encoder.layers.3.self_attn.q_proj`)
/// and the weight each is stored in; for OpenCLIP, q, k and v are row blocks of `in_proj_weight`.
pub fn clip_modules(model: &ClipTextModel) -> Vec<(String, Target)> {
    let c = &model.config;
    let d = c.hidden_size;
    let mut out = Vec::new();
    for i in 0..c.num_layers {
        let hf = |m: &str| format!("encoder.layers.{i}.{m}");
        match c.layout {
            ClipLayout::Hf => {
                for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"] {
                    out.push((hf(m), Target::whole(format!("{}.weight", hf(m)))));
                }
            }
            ClipLayout::OpenClip => {
                let r = format!("transformer.resblocks.{i}");
                for (j, m) in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].into_iter().enumerate() {
                    out.push((hf(m), Target { key: format!("{r}.attn.in_proj_weight"), rows: Some((j as i64 * d, d)) }));
                }
                out.push((hf("self_attn.out_proj"), Target::whole(format!("{r}.attn.out_proj.weight"))));
                out.push((hf("mlp.fc1"), Target::whole(format!("{r}.mlp.c_fc.weight"))));
                out.push((hf("mlp.fc2"), Target::whole(format!("{r}.mlp.c_proj.weight"))));
            }
        }
    }
    out
}

/// Every LoRA module name that addresses the UNet: kohya's `lora_unet_` + the diffusers path (what
/// kohya writes for SD 1.x/2.x) or + the LDM path, and PEFT's `unet.` + the diffusers path.
pub fn unet_key_map(config: &UnetConfig, state: &[(String, Tensor)]) -> HashMap<String, Target> {
    let mut map = HashMap::new();
    for (name, t) in state {
        if let (Some(module), true) = (name.strip_suffix(".weight"), t.dim() >= 2) {
            map.insert(format!("lora_unet_{}", module.replace('.', "_")), Target::whole(name.clone()));
        }
        // ComfyUI's own names (LoraSave): `diffusion_model.` + the LDM path.
        if let Some(module) = name.strip_suffix(".weight") {
            map.insert(format!("diffusion_model.{module}"), Target::whole(name.clone()));
        }
    }
    for (path, ldm) in unet_modules(config, state) {
        map.insert(format!("lora_unet_{}", path.replace('.', "_")), Target::whole(ldm.clone()));
        map.insert(format!("unet.{path}"), Target::whole(ldm));
    }
    map
}

/// Every LoRA module name that addresses the text encoder: kohya's `lora_te_text_model_…` and PEFT's
/// `text_encoder.text_model.…` or (transformers 5) `text_encoder.…`, all in transformers' layout, also
/// for SD 2.x's OpenCLIP.
pub fn clip_key_map(model: &Loaded<ClipTextModel>) -> HashMap<String, Target> {
    let mut map = HashMap::new();
    // ComfyUI's own names (LoraSave) address every weight of its transformers-layout encoders.
    if model.config.layout == ClipLayout::Hf {
        for (name, _) in model.state.iter() {
            if let Some(module) = name.strip_suffix(".weight") {
                for enc in ["clip_l", "clip_h"] {
                    map.insert(format!("text_encoders.{enc}.transformer.text_model.{module}"), Target::whole(name.clone()));
                }
            }
        }
    }
    for (path, target) in clip_modules(model) {
        map.insert(format!("lora_te_text_model_{}", path.replace('.', "_")), target.clone());
        map.insert(format!("text_encoder.text_model.{path}"), target.clone());
        // ComfyUI's own names (LoraSave): its SD 1.x (clip_l) and SD 2.x (clip_h) encoders.
        for enc in ["clip_l", "clip_h"] {
            map.insert(format!("text_encoders.{enc}.transformer.text_model.{path}"), target.clone());
        }
        map.insert(format!("text_encoder.{path}"), target);
    }
    map
}

/// A model's state with `patches` added: `(target, module, strength)`. Returns the new state (patched
/// tensors new, the others shared) and the number of weights patched.
pub fn patch_state(state: &[(String, Tensor)], patches: &[(&Target, &LoraModule, f64)]) -> Result<Vec<(String, Tensor)>, String> {
    let mut by_key: BTreeMap<&str, Vec<(&Target, &LoraModule, f64)>> = BTreeMap::new();
    for p in patches {
        by_key.entry(p.0.key.as_str()).or_default().push(*p);
    }
    let index: HashMap<&str, &Tensor> = state.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut patched: HashMap<&str, Tensor> = HashMap::new();
    for (key, list) in &by_key {
        let base = index.get(key).ok_or_else(|| format!("the model has no weight {key:?}"))?;
        // A copy even when the weights already are fp32: to_kind would return the base tensor itself,
        // and the in-place adds below would change the model the LoRA was applied to.
        let w = base.to_dtype(Kind::Float, false, true);
        for (target, m, strength) in list {
            let rank = m.down.size()[0];
            let scale = m.alpha.map_or(1.0, |a| a / rank as f64);
            let device = w.device();
            let to = |t: &Tensor| t.f_to_device(device).and_then(|t| t.f_flatten(1, -1)).map_err(|e| e.to_string());
            let delta = to(&m.up)?.f_mm(&to(&m.down)?).map_err(|e| e.to_string())?;
            let mut region = match target.rows {
                Some((start, len)) => w.f_narrow(0, start, len).map_err(|e| e.to_string())?,
                None => w.shallow_clone(),
            };
            if delta.numel() != region.numel() || delta.size()[0] != region.size()[0] {
                return Err(format!(
                    "{}: up {:?} × down {:?} does not fit {key} {:?} (a LoRA for another model family?)",
                    m.name,
                    m.up.size(),
                    m.down.size(),
                    region.size()
                ));
            }
            let delta = delta.f_reshape(region.size()).and_then(|d| d.f_mul_scalar(strength * scale)).map_err(|e| e.to_string())?;
            let _ = region.f_add_(&delta).map_err(|e| e.to_string())?;
        }
        patched.insert(key, w.to_kind(base.kind()));
    }
    Ok(state.iter().map(|(k, t)| (k.clone(), patched.remove(k.as_str()).unwrap_or_else(|| t.shallow_clone()))).collect())
}

/// `state` with full differences added: `w + strength · delta` in fp32, rounded once (a new tensor;
/// the model's own stays as it is).
fn add_diffs(mut state: Vec<(String, Tensor)>, diffs: &[(Target, &Tensor, f64)]) -> Result<Vec<(String, Tensor)>, String> {
    for (target, delta, strength) in diffs {
        let Some(entry) = state.iter_mut().find(|(k, _)| *k == target.key) else { return Err(format!("the model has no weight {:?}", target.key)) };
        let w = entry.1.to_dtype(Kind::Float, false, true);
        let mut region = match target.rows {
            Some((start, len)) => w.f_narrow(0, start, len).map_err(|e| e.to_string())?,
            None => w.shallow_clone(),
        };
        if region.size() != delta.size() {
            return Err(format!("a difference of shape {:?} does not fit {} {:?}", delta.size(), target.key, region.size()));
        }
        let _ = region.f_add_(&(delta.to_device(w.device()) * *strength)).map_err(|e| e.to_string())?;
        entry.1 = w.to_kind(entry.1.kind());
    }
    Ok(state)
}

/// The UNet rebuilt from a patched state.
pub fn rebuild_unet(unet: &Loaded<Unet>, state: Vec<(String, Tensor)>) -> Result<Loaded<Unet>, LoadError> {
    build(from_state(state), |p| Unet::new(p, unet.config.clone()), &mut 0)
}

/// The text encoder rebuilt from a patched state.
pub fn rebuild_clip(clip: &Loaded<ClipTextModel>, state: Vec<(String, Tensor)>) -> Result<Loaded<ClipTextModel>, LoadError> {
    build(from_state(state), |p| ClipTextModel::new(p, clip.config.clone()), &mut 0)
}

/// Weights serving a model state on its own device and in its own kind.
fn from_state(state: Vec<(String, Tensor)>) -> Weights {
    let (device, kind) = state.first().map_or((Device::Cpu, Kind::Float), |(_, t)| (t.device(), t.kind()));
    Weights::from_tensors(state, device, kind)
}

/// The model and text encoder with a LoRA file applied, each given with its strength only when it is to
/// be patched (`None`: unchanged), and the report lines. Keys that cannot be applied are reported, never
/// dropped silently; a file none of whose modules fits is an error.
pub fn apply_lora(
    path: &Path,
    model: Option<(&SdModel, f64)>,
    clip: Option<(&SdClip, f64)>,
) -> Result<(Option<SdModel>, Option<SdClip>, Vec<String>), NodeError> {
    let failed = |e: String| NodeError::input("lora_name", format!("{}: {e}", path.display()));
    let lora = LoraFile::open(path).map_err(|e| NodeError::Failed(e.to_string()))?;
    let unet_map = model.map(|(m, _)| unet_key_map(&m.unet.config, &m.unet.state)).unwrap_or_default();
    let clip_map = clip.map(|(c, _)| clip_key_map(&c.model)).unwrap_or_default();
    let is_text = |n: &str| n.starts_with("lora_te") || n.starts_with("text_encoder.") || n.starts_with("text_encoders.");
    let (mut unet_patches, mut clip_patches, mut unmatched, mut skipped) = (Vec::new(), Vec::new(), Vec::new(), (0, 0));
    for m in &lora.modules {
        match (unet_map.get(&m.name), clip_map.get(&m.name), model, clip) {
            (Some(t), _, Some((_, s)), _) => unet_patches.push((t, m, s)),
            (_, Some(t), _, Some((_, s))) => clip_patches.push((t, m, s)),
            // A part this node leaves alone (strength 0, or the model-only node).
            _ if is_text(&m.name) && clip.is_none() => skipped.1 += 1,
            _ if !is_text(&m.name) && model.is_none() => skipped.0 += 1,
            _ => unmatched.push(m.name.as_str()),
        }
    }
    // Full differences (`.diff`, `.diff_b`): the weight or bias of the module the name addresses.
    let (mut unet_diffs, mut clip_diffs) = (Vec::new(), Vec::new());
    for d in &lora.diffs {
        let target = |t: &Target| {
            let key = if d.bias { t.key.strip_suffix(".weight").map_or(t.key.clone(), |k| format!("{k}.bias")) } else { t.key.clone() };
            Target { key, rows: t.rows }
        };
        match (unet_map.get(&d.name), clip_map.get(&d.name), model, clip) {
            (Some(t), _, Some((_, s)), _) => unet_diffs.push((target(t), &d.delta, s)),
            (_, Some(t), _, Some((_, s))) => clip_diffs.push((target(t), &d.delta, s)),
            _ if is_text(&d.name) && clip.is_none() => skipped.1 += 1,
            _ if !is_text(&d.name) && model.is_none() => skipped.0 += 1,
            _ => unmatched.push(d.name.as_str()),
        }
    }
    if unet_patches.is_empty() && clip_patches.is_empty() && unet_diffs.is_empty() && clip_diffs.is_empty() {
        let kinds: Vec<&str> = lora.unsupported.iter().map(|(_, k)| *k).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        return Err(failed(match (lora.modules.first(), lora.unsupported.first()) {
            (Some(_), _) if unmatched.is_empty() => {
                format!("its {} UNet and {} text-encoder modules are all for a part this node does not patch", skipped.0, skipped.1)
            }
            (Some(first), _) => {
                format!("none of its {} LoRA modules addresses this model (first: {:?}); a LoRA for another model family?", lora.modules.len(), first.name)
            }
            (None, Some((key, _))) => format!("holds no LoRA up/down pairs diffloom can apply (first key {key:?}; kinds: {})", kinds.join(", ")),
            (None, None) => "holds no tensors".into(),
        }));
    }
    let mut messages = vec![format!(
        "{}: {} UNet weights (strength {}) and {} text-encoder weights (strength {}) patched",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        unet_patches.len(),
        model.map_or(0.0, |m| m.1),
        clip_patches.len(),
        clip.map_or(0.0, |c| c.1)
    )];
    for (n, part) in [(skipped.0, "UNet"), (skipped.1, "text-encoder")] {
        if n > 0 {
            messages.push(format!("{n} {part} modules not applied: this node leaves the {part} as it is"));
        }
    }
    let mut not_loaded: Vec<String> = unmatched.iter().map(|n| format!("{n} (no such module in this model)")).collect();
    not_loaded.extend(lora.unsupported.iter().map(|(k, why)| format!("{k} ({why})")));
    if !not_loaded.is_empty() {
        let shown: Vec<&str> = not_loaded.iter().take(5).map(String::as_str).collect();
        let more = if not_loaded.len() > 5 { format!(", and {} more", not_loaded.len() - 5) } else { String::new() };
        messages.push(format!("warning: {} LoRA keys not loaded: {}{more}", not_loaded.len(), shown.join(", ")));
    }
    let new_model = match model {
        Some((m, _)) if !unet_patches.is_empty() || !unet_diffs.is_empty() => {
            let state = add_diffs(patch_state(&m.unet.state, &unet_patches).map_err(failed)?, &unet_diffs).map_err(failed)?;
            let unet = rebuild_unet(&m.unet, state).map_err(|e| failed(e.to_string()))?;
            Some(SdModel { unet, ..m.clone() })
        }
        _ => None,
    };
    let new_clip = match clip {
        Some((c, _)) if !clip_patches.is_empty() || !clip_diffs.is_empty() => {
            let state = add_diffs(patch_state(&c.model.state, &clip_patches).map_err(failed)?, &clip_diffs).map_err(failed)?;
            let model = rebuild_clip(&c.model, state).map_err(|e| failed(e.to_string()))?;
            Some(SdClip { model, ..c.clone() })
        }
        _ => None,
    };
    Ok((new_model, new_clip, messages))
}
