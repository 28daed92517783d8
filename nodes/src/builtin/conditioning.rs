//! ComfyUI's `conditioning` category: prompt encoding and the CLIP layer choice.

use diffloom_core::{Args, Ctx, Handle, Int, Node, NodeError, Schema, Str, Value, ValueType};

use super::loaders::part;
use crate::sd::{EmbeddingDir, SdClip};

pub struct CLIPTextEncode;
impl Node for CLIPTextEncode {
    fn schema(&self) -> Schema {
        Schema::new("CLIPTextEncode", "conditioning")
            .describe("Encodes a prompt: (text:1.2) weights, \\( escapes, embedding:name textual inversions, \
                       prompts of any length in 77-token windows, as ComfyUI.")
            .input("text", Str::required().multiline())
            .input("clip", ValueType::Clip)
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let clip: &SdClip = part(a, "clip")?;
        let dir = cx.embeddings_dir.map(|d| EmbeddingDir { dir: d.to_path_buf(), family: clip.family });
        let _guard = tch::no_grad_guard();
        let cond = clip.encode(a.string("text")?, dir.as_ref().map(|d| d as &dyn crate::prompt::EmbeddingSource))?;
        Ok(vec![Value::Conditioning(vec![cond])])
    }
}

pub struct CLIPSetLastLayer;
impl Node for CLIPSetLastLayer {
    fn schema(&self) -> Schema {
        Schema::new("CLIPSetLastLayer", "conditioning")
            .describe("Uses an earlier layer of the text encoder (-2 is \"clip skip 2\").")
            .input("clip", ValueType::Clip)
            .input("stop_at_clip_layer", Int::new(-1).range(-24, -1))
            .output("CLIP", ValueType::Clip)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let clip: &SdClip = part(a, "clip")?;
        let layer = a.i64("stop_at_clip_layer")?;
        let label = format!("{} (layer {layer})", clip.model.config.hidden_size);
        Ok(vec![Value::Clip(Handle::new(SdClip { layer: Some(layer), ..clip.clone() }, 0, label))])
    }
}

/// A CONDITIONING input's entries.
pub(crate) fn conds(a: &Args, input: &str) -> Result<Vec<diffloom_core::value::CondEntry>, NodeError> {
    match a.any(input)? {
        Value::Conditioning(c) => Ok(c.clone()),
        v => Err(NodeError::input(input, format!("expected CONDITIONING, got {}", v.value_type()))),
    }
}

pub struct ConditioningCombine;
impl Node for ConditioningCombine {
    fn schema(&self) -> Schema {
        Schema::new("ConditioningCombine", "conditioning")
            .describe("Both conditionings guide the sampler (their predictions are averaged).")
            .input("conditioning_1", ValueType::Conditioning)
            .input("conditioning_2", ValueType::Conditioning)
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let mut c = conds(a, "conditioning_1")?;
        c.extend(conds(a, "conditioning_2")?);
        Ok(vec![Value::Conditioning(c)])
    }
}

pub struct ConditioningConcat;
impl Node for ConditioningConcat {
    fn schema(&self) -> Schema {
        Schema::new("ConditioningConcat", "conditioning")
            .describe("Appends the tokens of conditioning_from to each entry of conditioning_to.")
            .input("conditioning_to", ValueType::Conditioning)
            .input("conditioning_from", ValueType::Conditioning)
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let from = conds(a, "conditioning_from")?;
        let Some(first) = from.first() else { return Err(NodeError::input("conditioning_from", "the conditioning is empty")) };
        let out = conds(a, "conditioning_to")?
            .into_iter()
            .map(|e| {
                let t = tch::Tensor::f_cat(&[e.cross_attn.0.shallow_clone(), first.cross_attn.0.shallow_clone()], 1)?;
                Ok(diffloom_core::value::CondEntry { cross_attn: diffloom_core::value::Shared(t), pooled: e.pooled })
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        Ok(vec![Value::Conditioning(out)])
    }
}

pub struct ConditioningZeroOut;
impl Node for ConditioningZeroOut {
    fn schema(&self) -> Schema {
        Schema::new("ConditioningZeroOut", "advanced/conditioning")
            .input("conditioning", ValueType::Conditioning)
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let out = conds(a, "conditioning")?
            .into_iter()
            .map(|e| diffloom_core::value::CondEntry {
                cross_attn: diffloom_core::value::Shared(e.cross_attn.0.zeros_like()),
                pooled: e.pooled.map(|p| diffloom_core::value::Shared(p.0.zeros_like())),
            })
            .collect();
        Ok(vec![Value::Conditioning(out)])
    }
}
