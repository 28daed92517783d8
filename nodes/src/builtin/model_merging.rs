//! ComfyUI's weight patches — model merging (`advanced/model_merging`) and the attention multipliers
//! (`_for_testing/attention_experiments`) — and CheckpointSave. Each computes new weights as ComfyUI's
//! `calculate_weight` does for a "diff" patch — `w = w1·strength_model + strength_patch·w2`, in fp32,
//! rounded once to the model's kind — and rebuilds the model around them; weights it does not touch
//! stay shared with the input, which is never changed.

use std::collections::HashMap;

use diffloom_core::{Args, Ctx, Float, Handle, Node, NodeError, Schema, Str, Value, ValueType};
use tch::{Kind, Tensor};

use crate::lora::{rebuild_clip, rebuild_unet};
use crate::sd::{SdClip, SdModel, SdVae};

/// `w·strength_model + strength_patch·other` as ComfyUI computes it (the multiply skipped at 1, the
/// add skipped at 0), or None when nothing changes.
fn combine(w: &Tensor, other: Option<&Tensor>, strength_model: f64, strength_patch: f64) -> Option<Tensor> {
    if strength_model == 1.0 && (strength_patch == 0.0 || other.is_none()) {
        return None;
    }
    // A copy: the input model's tensor must not change.
    let mut out = w.to_dtype(Kind::Float, false, true);
    if strength_model != 1.0 {
        out *= strength_model;
    }
    if let Some(o) = other.filter(|_| strength_patch != 0.0) {
        let o = o.to_device(out.device()).to_kind(Kind::Float) * strength_patch;
        out += o;
    }
    Some(out.to_kind(w.kind()))
}

/// `state1` with each weight merged with `state2`'s of the same name by `(strength_model,
/// strength_patch)` for that key; weights whose shapes differ are kept scaled (as ComfyUI keeps them)
/// and listed in the messages.
fn merged_state(cx: &mut Ctx, state1: &[(String, Tensor)], state2: &[(String, Tensor)], strengths: impl Fn(&str) -> (f64, f64)) -> Vec<(String, Tensor)> {
    let other: HashMap<&str, &Tensor> = state2.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut mismatched = Vec::new();
    let state = state1
        .iter()
        .map(|(k, w)| {
            let (sm, sp) = strengths(k);
            let o = match other.get(k.as_str()).copied() {
                Some(o) if o.size() != w.size() => {
                    mismatched.push(k.clone());
                    None
                }
                o => o,
            };
            (k.clone(), combine(w, o, sm, sp).unwrap_or_else(|| w.shallow_clone()))
        })
        .collect();
    if !mismatched.is_empty() {
        cx.messages.push(format!(
            "warning: {} weights differ in shape and were not merged: {}",
            mismatched.len(),
            mismatched.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    state
}

/// `model1` with `model2` merged in by `strengths` per key.
fn merge(cx: &mut Ctx, a: &Args, strengths: impl Fn(&str) -> (f64, f64), what: &str) -> Result<Vec<Value>, NodeError> {
    let (m1, m2): (&SdModel, &SdModel) = (a.handle("model1")?, a.handle("model2")?);
    let state = merged_state(cx, &m1.unet.state, &m2.unet.state, strengths);
    let unet = rebuild_unet(&m1.unet, state).map_err(|e| NodeError::Failed(e.to_string()))?;
    let label = format!("{} {what} {}", m1.name, m2.name);
    Ok(vec![Value::Model(Handle::new(SdModel { unet, ..m1.clone() }, 0, label))])
}

/// `clip1` with `clip2` merged in by `strengths` (ComfyUI skips `position_ids` and `logit_scale`).
fn merge_clip(cx: &mut Ctx, a: &Args, strengths: impl Fn(&str) -> (f64, f64)) -> Result<Vec<Value>, NodeError> {
    let (c1, c2): (&SdClip, &SdClip) = (a.handle("clip1")?, a.handle("clip2")?);
    let skip = |k: &str| k.ends_with(".position_ids") || k.ends_with(".logit_scale");
    let state = merged_state(cx, &c1.model.state, &c2.model.state, |k| if skip(k) { (1.0, 0.0) } else { strengths(k) });
    let model = rebuild_clip(&c1.model, state).map_err(|e| NodeError::Failed(e.to_string()))?;
    Ok(vec![Value::Clip(Handle::new(SdClip { model, ..c1.clone() }, 0, "CLIP (merged)"))])
}

fn two_clips(name: &str) -> Schema {
    Schema::new(name, "advanced/model_merging").input("clip1", ValueType::Clip).input("clip2", ValueType::Clip)
}

pub struct CLIPMergeSimple;
impl Node for CLIPMergeSimple {
    fn schema(&self) -> Schema {
        two_clips("CLIPMergeSimple")
            .describe("clip1·ratio + clip2·(1 − ratio), weight by weight.")
            .input("ratio", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("CLIP", ValueType::Clip)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let ratio = a.float("ratio")?;
        merge_clip(cx, a, |_| (ratio, 1.0 - ratio))
    }
}

pub struct CLIPMergeSubtract;
impl Node for CLIPMergeSubtract {
    fn schema(&self) -> Schema {
        two_clips("CLIPMergeSubtract")
            .describe("multiplier·(clip1 − clip2), weight by weight.")
            .input("multiplier", Float::new(1.0).range(-10.0, 10.0).step(0.01))
            .output("CLIP", ValueType::Clip)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let m = a.float("multiplier")?;
        merge_clip(cx, a, |_| (m, -m))
    }
}

pub struct CLIPMergeAdd;
impl Node for CLIPMergeAdd {
    fn schema(&self) -> Schema {
        two_clips("CLIPMergeAdd").describe("clip1 + clip2, weight by weight.").output("CLIP", ValueType::Clip)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        merge_clip(cx, a, |_| (1.0, 1.0))
    }
}

fn two_models(name: &str) -> Schema {
    Schema::new(name, "advanced/model_merging").input("model1", ValueType::Model).input("model2", ValueType::Model)
}

pub struct ModelMergeSimple;
impl Node for ModelMergeSimple {
    fn schema(&self) -> Schema {
        two_models("ModelMergeSimple")
            .describe("model1·ratio + model2·(1 − ratio), weight by weight (ratio 1 is model1).")
            .input("ratio", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let ratio = a.float("ratio")?;
        merge(cx, a, |_| (ratio, 1.0 - ratio), "merged with")
    }
}

pub struct ModelMergeSubtract;
impl Node for ModelMergeSubtract {
    fn schema(&self) -> Schema {
        two_models("ModelMergeSubtract")
            .describe("multiplier·(model1 − model2), weight by weight.")
            .input("multiplier", Float::new(1.0).range(-10.0, 10.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let m = a.float("multiplier")?;
        merge(cx, a, |_| (m, -m), "minus")
    }
}

pub struct ModelMergeAdd;
impl Node for ModelMergeAdd {
    fn schema(&self) -> Schema {
        two_models("ModelMergeAdd").describe("model1 + model2, weight by weight.").output("MODEL", ValueType::Model)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        merge(cx, a, |_| (1.0, 1.0), "plus")
    }
}

/// ComfyUI's ModelMergeBlocks rule: the ratio of the longest input name that is a prefix of the key,
/// else the first ratio input's.
fn block_ratio(key: &str, ratios: &[(String, f64)]) -> f64 {
    ratios.iter().filter(|(name, _)| key.starts_with(name.as_str())).max_by_key(|(name, _)| name.len()).or(ratios.first()).map_or(1.0, |(_, r)| *r)
}

fn merge_by_blocks(cx: &mut Ctx, a: &Args, names: &[String]) -> Result<Vec<Value>, NodeError> {
    let ratios: Vec<(String, f64)> = names.iter().map(|n| Ok((n.clone(), a.float(n)?))).collect::<Result<_, NodeError>>()?;
    merge(
        cx,
        a,
        |k| {
            let r = block_ratio(k, &ratios);
            (r, 1.0 - r)
        },
        "merged by blocks with",
    )
}

pub struct ModelMergeBlocks;
impl Node for ModelMergeBlocks {
    fn schema(&self) -> Schema {
        let mut s = two_models("ModelMergeBlocks").describe("ModelMergeSimple with a ratio each for the input blocks, the middle block and the output blocks.");
        for name in ["input", "middle", "out"] {
            s = s.input(name, Float::new(1.0).range(0.0, 1.0).step(0.01));
        }
        s.output("MODEL", ValueType::Model)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        merge_by_blocks(cx, a, &["input".into(), "middle".into(), "out".into()])
    }
}

/// ModelMergeSD1's inputs (ComfyUI registers ModelMergeSD2 as the same class): one ratio per block.
fn sd_block_names() -> Vec<String> {
    let mut names = vec!["time_embed.".to_owned(), "label_emb.".to_owned()];
    names.extend((0..12).map(|i| format!("input_blocks.{i}.")));
    names.extend((0..3).map(|i| format!("middle_block.{i}.")));
    names.extend((0..12).map(|i| format!("output_blocks.{i}.")));
    names.push("out.".to_owned());
    names
}

pub struct ModelMergeSD(pub &'static str);
impl Node for ModelMergeSD {
    fn schema(&self) -> Schema {
        let mut s = Schema::new(self.0, "advanced/model_merging/model_specific")
            .describe("ModelMergeSimple with a ratio for each block of an SD 1.x/2.x UNet.")
            .input("model1", ValueType::Model)
            .input("model2", ValueType::Model);
        for name in sd_block_names() {
            s = s.input(&name, Float::new(1.0).range(0.0, 1.0).step(0.01));
        }
        s.output("MODEL", ValueType::Model)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        merge_by_blocks(cx, a, &sd_block_names())
    }
}

/// The attention projections' factors: (key suffix, factor) for q, k, v and out.
fn factors(a: &Args, attn: &str) -> Result<Vec<(String, f64)>, NodeError> {
    let mut out = Vec::new();
    for (proj, input) in [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "out")] {
        let f = a.float(input)?;
        out.push((format!("{attn}.{proj}.weight"), f));
        out.push((format!("{attn}.{proj}.bias"), f));
    }
    Ok(out)
}

fn attention_multiply(a: &Args, attn: &str) -> Result<Vec<Value>, NodeError> {
    let m: &SdModel = a.handle("model")?;
    let factors = factors(a, attn)?;
    let state: Vec<(String, Tensor)> = m
        .unet
        .state
        .iter()
        .map(|(k, w)| {
            let f = factors.iter().find(|(suffix, _)| k.ends_with(suffix.as_str())).map_or(1.0, |(_, f)| *f);
            (k.clone(), combine(w, None, f, 0.0).unwrap_or_else(|| w.shallow_clone()))
        })
        .collect();
    let unet = rebuild_unet(&m.unet, state).map_err(|e| NodeError::Failed(e.to_string()))?;
    Ok(vec![Value::Model(Handle::new(SdModel { unet, ..m.clone() }, 0, format!("{} ({attn} scaled)", m.name)))])
}

fn multiply_schema(name: &str, input: &str, ty: ValueType) -> Schema {
    let mut s = Schema::new(name, "_for_testing/attention_experiments").input(input, ty);
    for f in ["q", "k", "v", "out"] {
        s = s.input(f, Float::new(1.0).range(0.0, 10.0).step(0.01));
    }
    s.output(ty.name(), ty)
}

pub struct UNetSelfAttentionMultiply;
impl Node for UNetSelfAttentionMultiply {
    fn schema(&self) -> Schema {
        multiply_schema("UNetSelfAttentionMultiply", "model", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        attention_multiply(a, "attn1")
    }
}

pub struct UNetCrossAttentionMultiply;
impl Node for UNetCrossAttentionMultiply {
    fn schema(&self) -> Schema {
        multiply_schema("UNetCrossAttentionMultiply", "model", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        attention_multiply(a, "attn2")
    }
}

pub struct CLIPAttentionMultiply;
impl Node for CLIPAttentionMultiply {
    fn schema(&self) -> Schema {
        multiply_schema("CLIPAttentionMultiply", "clip", ValueType::Clip)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let c: &SdClip = a.handle("clip")?;
        let (q, k, v, out) = (a.float("q")?, a.float("k")?, a.float("v")?, a.float("out")?);
        let mut state = Vec::with_capacity(c.model.state.len());
        for (key, w) in c.model.state.iter() {
            let scaled = if key.contains("self_attn.") {
                // transformers' layout: one projection per tensor.
                let f = [("q_proj.", q), ("k_proj.", k), ("v_proj.", v), ("out_proj.", out)].iter().find(|(p, _)| key.contains(p)).map_or(1.0, |(_, f)| *f);
                combine(w, None, f, 0.0)
            } else if key.ends_with("attn.in_proj_weight") || key.ends_with("attn.in_proj_bias") {
                // OpenCLIP's fused projection: q, k and v are its three row blocks.
                let d = w.size()[0] / 3;
                let parts = [(0, q), (1, k), (2, v)];
                (parts.iter().any(|(_, f)| *f != 1.0)).then(|| {
                    let blocks: Vec<Tensor> = parts.iter().map(|(i, f)| w.narrow(0, i * d, d).to_kind(Kind::Float) * *f).collect();
                    Tensor::cat(&blocks, 0).to_kind(w.kind())
                })
            } else if key.contains("attn.out_proj.") {
                combine(w, None, out, 0.0)
            } else {
                None
            };
            state.push((key.clone(), scaled.unwrap_or_else(|| w.shallow_clone())));
        }
        let model = rebuild_clip(&c.model, state).map_err(|e| NodeError::Failed(e.to_string()))?;
        Ok(vec![Value::Clip(Handle::new(SdClip { model, ..c.clone() }, 0, "CLIP (attention scaled)"))])
    }
}

/// ComfyUI's CheckpointSave: the model (patched weights included; hooks are not weights), text encoder
/// and VAE as one single-file checkpoint in the LDM layout, `<output>/<prefix>_<NNNNN>_.safetensors`,
/// never overwriting a file.
pub struct CheckpointSave;
impl Node for CheckpointSave {
    fn schema(&self) -> Schema {
        Schema::new("CheckpointSave", "advanced/model_merging")
            .describe("Saves MODEL, CLIP and VAE as a single-file .safetensors checkpoint (LDM key layout) in the output directory.")
            .input("model", ValueType::Model)
            .input("clip", ValueType::Clip)
            .input("vae", ValueType::Vae)
            .input("filename_prefix", Str::new("checkpoints/ComfyUI"))
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        use crate::checkpoint::detect::{ModelConfig, Prediction, CLIP_HF_PREFIX, CLIP_OPEN_PREFIX, CONFIG_METADATA_KEY, UNET_PREFIX, VAE_PREFIX};
        use crate::models::clip::ClipLayout;
        use crate::sampling::model_sampling::Parameterization;
        let (m, c, v): (&SdModel, &SdClip, &SdVae) = (a.handle("model")?, a.handle("clip")?, a.handle("vae")?);
        let clip_prefix = match c.model.config.layout {
            ClipLayout::Hf => format!("{CLIP_HF_PREFIX}text_model."),
            ClipLayout::OpenClip => CLIP_OPEN_PREFIX.to_owned(),
        };
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (prefix, state) in [(UNET_PREFIX, &m.unet.state), (VAE_PREFIX, &v.model.state), (clip_prefix.as_str(), &c.model.state)] {
            tensors.extend(state.iter().map(|(k, t)| (format!("{prefix}{k}"), t.shallow_clone())));
        }
        let v_pred = m.sampling.parameterization == Parameterization::V;
        // ComfyUI's markers of a v-prediction (and zero-terminal-SNR) model.
        if v_pred {
            tensors.push(("v_pred".into(), Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))));
            if m.sampling.zsnr {
                tensors.push(("ztsnr".into(), Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))));
            }
        }
        let config = ModelConfig {
            family: m.family,
            prediction: if v_pred { Prediction::V } else { Prediction::Eps },
            unet: Some(m.unet.config.clone()),
            vae: Some(v.model.config.clone()),
            clip: Some(c.model.config.clone()),
        };
        let mut metadata: HashMap<String, String> = (cx.image_texts)(0, 0).into_iter().collect();
        metadata.insert("modelspec.predict_key".into(), if v_pred { "v" } else { "epsilon" }.into());
        // The architecture as diffloom loads it (the only way to describe head layouts the shapes do
        // not show, as in the tiny test models; a real model's detection agrees with it).
        metadata.insert(CONFIG_METADATA_KEY.into(), serde_json::to_string(&config).map_err(|e| NodeError::Failed(e.to_string()))?);
        save_tensors(cx, a.string("filename_prefix")?, &tensors, Some(metadata))?;
        Ok(vec![])
    }
}

/// Writes `tensors` as `<output>/<prefix>_NNNNN_.safetensors` (never overwriting a file).
fn save_tensors(cx: &mut Ctx, prefix: &str, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<(), NodeError> {
    let dir = cx.output_dir.to_path_buf();
    crate::imageio::check_confined(cx, &dir, prefix)?;
    let bytes = crate::checkpoint::synthetic::serialize(tensors, metadata).map_err(NodeError::Failed)?;
    let path = crate::imageio::save_numbered(&dir, prefix, "safetensors", |f| std::io::Write::write_all(f, &bytes).map_err(|e| e.to_string()))?;
    cx.messages.push(format!("wrote {} ({} tensors)", path.display(), tensors.len()));
    Ok(())
}

/// The graph texts ComfyUI writes into saved model files (`prompt`, `workflow`), `format: pt`, and the
/// part's architecture as diffloom loads it (`diffloom.config`: head layouts the shapes do not show).
fn saved_metadata(cx: &Ctx, config: &crate::checkpoint::detect::ModelConfig) -> Result<HashMap<String, String>, NodeError> {
    let mut m: HashMap<String, String> = (cx.image_texts)(0, 0).into_iter().collect();
    m.insert("format".into(), "pt".into());
    m.insert(crate::checkpoint::detect::CONFIG_METADATA_KEY.into(), serde_json::to_string(config).map_err(|e| NodeError::Failed(e.to_string()))?);
    Ok(m)
}

/// A config describing one part.
fn part_config(family: crate::checkpoint::detect::Family, v: bool) -> crate::checkpoint::detect::ModelConfig {
    use crate::checkpoint::detect::{ModelConfig, Prediction};
    ModelConfig { family, prediction: if v { Prediction::V } else { Prediction::Eps }, unet: None, vae: None, clip: None }
}

/// ComfyUI's ModelSave: the UNet alone (patched weights included) in the single-file names.
pub struct ModelSave;
impl Node for ModelSave {
    fn schema(&self) -> Schema {
        Schema::new("ModelSave", "advanced/model_merging")
            .describe("Saves the UNet (model.diffusion_model.*) as .safetensors in the output directory; UNETLoader reads it.")
            .input("model", ValueType::Model)
            .input("filename_prefix", Str::new("diffusion_models/ComfyUI"))
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        use crate::checkpoint::detect::UNET_PREFIX;
        let m: &SdModel = a.handle("model")?;
        let mut tensors: Vec<(String, Tensor)> = m.unet.state.iter().map(|(k, t)| (format!("{UNET_PREFIX}{k}"), t.shallow_clone())).collect();
        let v = m.sampling.parameterization == crate::sampling::model_sampling::Parameterization::V;
        if v {
            tensors.push(("v_pred".into(), Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))));
        }
        let config = crate::checkpoint::detect::ModelConfig { unet: Some(m.unet.config.clone()), ..part_config(m.family, v) };
        let metadata = saved_metadata(cx, &config)?;
        save_tensors(cx, a.string("filename_prefix")?, &tensors, Some(metadata))?;
        Ok(vec![])
    }
}

/// ComfyUI's CLIPSave: the text encoder in transformers' names (`text_model.…`), the file named
/// `<prefix>_clip_l` as ComfyUI names an SD 1.x encoder's (SD 2.x's OpenCLIP tower keeps OpenCLIP's
/// names, `<prefix>_clip_h`; CLIPLoader reads both).
pub struct CLIPSave;
impl Node for CLIPSave {
    fn schema(&self) -> Schema {
        Schema::new("CLIPSave", "advanced/model_merging")
            .describe("Saves the text encoder as .safetensors in the output directory; CLIPLoader reads it.")
            .input("clip", ValueType::Clip)
            .input("filename_prefix", Str::new("clip/ComfyUI"))
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        use crate::models::clip::ClipLayout;
        let c: &SdClip = a.handle("clip")?;
        let (name, root) = match c.model.config.layout {
            ClipLayout::Hf => ("clip_l", "text_model."),
            ClipLayout::OpenClip => ("clip_h", ""),
        };
        let tensors: Vec<(String, Tensor)> = c.model.state.iter().map(|(k, t)| (format!("{root}{k}"), t.shallow_clone())).collect();
        let prefix = format!("{}_{name}", a.string("filename_prefix")?);
        let config = crate::checkpoint::detect::ModelConfig { clip: Some(c.model.config.clone()), ..part_config(c.family, false) };
        let metadata = saved_metadata(cx, &config)?;
        save_tensors(cx, &prefix, &tensors, Some(metadata))?;
        Ok(vec![])
    }
}

/// ComfyUI's VAESave: the VAE's own names (`encoder.…`, `decoder.…`); VAELoader reads it.
pub struct VAESave;
impl Node for VAESave {
    fn schema(&self) -> Schema {
        Schema::new("VAESave", "advanced/model_merging")
            .describe("Saves the VAE as .safetensors in the output directory; VAELoader reads it.")
            .input("vae", ValueType::Vae)
            .input("filename_prefix", Str::new("vae/ComfyUI_vae"))
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let v: &SdVae = a.handle("vae")?;
        let tensors: Vec<(String, Tensor)> = v.model.state.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        let config = crate::checkpoint::detect::ModelConfig { vae: Some(v.model.config.clone()), ..part_config(crate::checkpoint::detect::Family::Sd1, false) };
        let metadata = saved_metadata(cx, &config)?;
        save_tensors(cx, a.string("filename_prefix")?, &tensors, Some(metadata))?;
        Ok(vec![])
    }
}

/// ComfyUI's `extract_lora`: the best rank-`rank` factorisation of a weight difference (SVD), its
/// values clamped to their 0.99 quantile; convolutions flattened (1×1 squeezed) and shaped back.
fn extract_lora(diff: &Tensor, rank: i64) -> Result<(Tensor, Tensor), NodeError> {
    let s = diff.size();
    let (out_dim, in_dim) = (s[0], s[1]);
    let rank = rank.min(in_dim).min(out_dim);
    let conv = s.len() == 4;
    let m = match s.as_slice() {
        [_, _, 1, 1] => diff.reshape([out_dim, in_dim]),
        [_, _, _, _] => diff.flatten(1, -1),
        _ => diff.shallow_clone(),
    };
    // torch.svd (linalg_svd without a driver, which tch cannot leave unset): V, not Vᴴ.
    let (u, sv, v) = m.to_kind(Kind::Float).f_svd(true, true)?;
    let vh = v.transpose(0, 1);
    let u = u.narrow(1, 0, rank).matmul(&sv.narrow(0, 0, rank).diag(0));
    let vh = vh.narrow(0, 0, rank);
    let all = Tensor::cat(&[u.flatten(0, -1), vh.flatten(0, -1)], 0);
    let hi = all.f_quantile_scalar(0.99, None::<i64>, false, "linear")?.double_value(&[]);
    let (u, vh) = (u.clamp(-hi, hi), vh.clamp(-hi, hi));
    Ok(if conv { (u.reshape([out_dim, rank, 1, 1]), vh.reshape([rank, in_dim, s[2], s[3]])) } else { (u, vh) })
}

/// The LoRA keys of one model part's difference state: `prefix` + the module path.
fn lora_tensors(state: &[(String, Tensor)], prefix: &str, rank: i64, full: bool, bias_diff: bool, out: &mut Vec<(String, Tensor)>) -> Result<(), NodeError> {
    for (k, w) in state {
        if let Some(module) = k.strip_suffix(".weight") {
            let base = format!("{prefix}{module}");
            if full || w.dim() < 2 {
                if full || bias_diff {
                    out.push((format!("{base}.diff"), w.to_kind(Kind::Half)));
                }
                continue;
            }
            let (up, down) = extract_lora(w, rank)?;
            out.push((format!("{base}.lora_up.weight"), up.to_kind(Kind::Half).contiguous()));
            out.push((format!("{base}.lora_down.weight"), down.to_kind(Kind::Half).contiguous()));
        } else if let (Some(module), true) = (k.strip_suffix(".bias"), bias_diff) {
            out.push((format!("{prefix}{module}.diff_b"), w.to_kind(Kind::Half)));
        }
    }
    Ok(())
}

/// ComfyUI's LoraSave ("Extract and Save Lora"): a LoRA from a model difference (ModelMergeSubtract's
/// output) and a text-encoder difference, in ComfyUI's key names, which LoraLoader reads back.
pub struct LoraSave;
impl Node for LoraSave {
    fn schema(&self) -> Schema {
        Schema::new("LoraSave", "_for_testing")
            .describe("Extracts a LoRA (SVD to the given rank, or full differences) from a model difference and saves it, never overwriting.")
            .input("filename_prefix", Str::new("loras/ComfyUI_extracted_lora"))
            .input("rank", diffloom_core::Int::new(8).range(1, 4096))
            .input("lora_type", diffloom_core::Combo::of(&["standard", "full_diff"]))
            .input("bias_diff", diffloom_core::Bool(true))
            .optional("model_diff", ValueType::Model)
            .optional("text_encoder_diff", ValueType::Clip)
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        use crate::models::clip::ClipLayout;
        let (rank, full, bias_diff) = (a.i64("rank")?, a.string("lora_type")? == "full_diff", a.boolean("bias_diff")?);
        let mut tensors = Vec::new();
        if a.get("model_diff").is_some() {
            let m: &SdModel = a.handle("model_diff")?;
            lora_tensors(&m.unet.state, "diffusion_model.", rank, full, bias_diff, &mut tensors)?;
        }
        if a.get("text_encoder_diff").is_some() {
            let c: &SdClip = a.handle("text_encoder_diff")?;
            if c.model.config.layout == ClipLayout::OpenClip {
                return Err(NodeError::input("text_encoder_diff", "SD 2.x (OpenCLIP) text-encoder differences are not extracted yet; leave this input empty"));
            }
            lora_tensors(&c.model.state, "text_encoders.clip_l.transformer.text_model.", rank, full, bias_diff, &mut tensors)?;
        }
        if tensors.is_empty() {
            cx.messages.push("nothing to save: neither model_diff nor text_encoder_diff is connected".into());
            return Ok(vec![]);
        }
        save_tensors(cx, a.string("filename_prefix")?, &tensors, None)?;
        Ok(vec![])
    }
}
