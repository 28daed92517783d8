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
