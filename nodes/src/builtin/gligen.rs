//! GLIGEN's two nodes (ComfyUI's `nodes.py`): GLIGENLoader (`loaders`) and GLIGENTextBoxApply
//! (`conditioning/gligen`). The model is in `models/gligen.rs`; the sampler turns a conditioning's
//! boxes into the UNet's middle patch (`sampling/guidance.rs`).

use std::path::Path;
use std::rc::Rc;

use diffloom_core::value::{CondEntry, Shared};
use diffloom_core::{Args, Ctx, Handle, Int, Locator, Node, NodeError, Schema, Str, Value, ValueType};
use tch::{Device, Kind, Tensor};

use super::shared::MAX_RESOLUTION;
use crate::models::clip::ClipOutput;
use crate::models::gligen::{load_gligen, GligenBox, GligenCond, GligenModel};
use crate::prompt::{EmbeddingSource, Slot};
use crate::sd::{EmbeddingDir, SdClip};
use crate::tokenizer::END;

pub struct GLIGENLoader;
impl Node for GLIGENLoader {
    fn schema(&self) -> Schema {
        Schema::new("GLIGENLoader", "loaders")
            .describe("Loads a GLIGEN text-box model for SD 1.x (ComfyUI's gligen_sd14_textbox_pruned layout).")
            .input("gligen_name", Str::required())
            .doc("path to the file in the gligen folder")
            .output("GLIGEN", ValueType::Gligen)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        super::loaders::file_stamp(files, "gligen", "gligen_name", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.model("gligen", "gligen_name", a.string("gligen_name")?)?;
        let (model, bytes) = load_gligen(&path, cx.device, cx.dtype).map_err(|e| NodeError::Failed(e.to_string()))?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let widths: Vec<String> = model.fusers.iter().map(|(_, f)| f.query_dim.to_string()).collect();
        cx.messages.push(format!(
            "{name}: GLIGEN, {} gated self-attention blocks ({} wide), {}-wide grounding tokens",
            model.fusers.len(),
            widths.join(", "),
            model.key_dim
        ));
        Ok(vec![Value::Gligen(Handle::new(GligenModel { model: Rc::new(model), name: name.clone() }, bytes, name))])
    }
}

pub struct GLIGENTextBoxApply;
impl Node for GLIGENTextBoxApply {
    fn schema(&self) -> Schema {
        Schema::new("GLIGENTextBoxApply", "conditioning/gligen")
            .describe("Places the text in a box of the image (pixels, multiples of 8): GLIGEN grounds it there while sampling.")
            .input("conditioning_to", ValueType::Conditioning)
            .input("clip", ValueType::Clip)
            .input("gligen_textbox_model", ValueType::Gligen)
            .input("text", Str::required().multiline())
            .input("width", Int::new(64).range(8, MAX_RESOLUTION).step(8))
            .input("height", Int::new(64).range(8, MAX_RESOLUTION).step(8))
            .input("x", Int::new(0).range(0, MAX_RESOLUTION).step(8))
            .input("y", Int::new(0).range(0, MAX_RESOLUTION).step(8))
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let clip: &SdClip = a.handle("clip")?;
        let gligen: &GligenModel = a.handle("gligen_textbox_model")?;
        let dir = EmbeddingDir { dirs: cx.files.folders.dirs("embeddings").map(Path::to_path_buf).collect(), family: clip.family };
        let pooled = pooled_unprojected(clip, a.string("text")?, Some(&dir))?;
        // ComfyUI's (cond_pooled, height // 8, width // 8, y // 8, x // 8), in latent pixels.
        let new_box = GligenBox { pooled: Shared(pooled), height: a.i64("height")? / 8, width: a.i64("width")? / 8, y: a.i64("y")? / 8, x: a.i64("x")? / 8 };
        let out = a
            .conditioning("conditioning_to")?
            .iter()
            .map(|e| {
                // The boxes applied before (by any GLIGEN model) stay; this node's model runs them all.
                let mut boxes = e.gligen.as_ref().and_then(|h| h.downcast::<GligenCond>()).map(|g| g.boxes.clone()).unwrap_or_default();
                boxes.push(new_box.clone());
                let label = format!("{} ({} boxes)", gligen.name, boxes.len());
                let g = GligenCond { model: gligen.model.clone(), name: gligen.name.clone(), boxes };
                CondEntry { gligen: Some(Handle::new(g, 0, label)), ..e.clone() }
            })
            .collect();
        Ok(vec![Value::Conditioning(out)])
    }
}

/// The text encoder's pooled output before any projection (ComfyUI's `encode_from_tokens(…,
/// return_pooled="unprojected")`): the final-layer-normed last layer at the first end token of the
/// prompt's first 77-token window, whatever layer CLIPSetLastLayer chose (ComfyUI runs every layer and
/// pools the last); `[1, dim]` float32 on the CPU. Weights do not change it.
pub fn pooled_unprojected(clip: &SdClip, text: &str, embeddings: Option<&dyn EmbeddingSource>) -> Result<Tensor, NodeError> {
    let fail = |m: String| NodeError::input("text", m);
    let windows = crate::prompt::tokenize(&clip.tokenizer, text, clip.family.spec().pad_token, embeddings).map_err(fail)?;
    let Some(first) = windows.windows.first() else { return Err(fail("the prompt gave no tokens".into())) };
    let ids: Vec<i64> = first
        .iter()
        .map(|(s, _)| match s {
            Slot::Token(t) => *t as i64,
            Slot::Embedding { .. } => 0,
        })
        .collect();
    let device = clip.model.device();
    let x = clip.model.embed_tokens(&Tensor::from_slice(&ids).view([1, -1]).to_device(device));
    let dim = clip.model.config.hidden_size;
    for (p, (slot, _)) in first.iter().enumerate() {
        if let Slot::Embedding { embedding, row } = slot {
            let v = windows.embeddings[*embedding].get(*row);
            if v.size()[0] != dim {
                return Err(fail(format!("a textual-inversion embedding has width {}, but this text encoder's is {dim}", v.size()[0])));
            }
            x.get(0).get(p as i64).copy_(&v.to_device(device).to_kind(x.kind()));
        }
    }
    let z = clip.model.encode_embeddings(&x, ClipOutput::Last);
    let eos = first.iter().position(|(s, _)| *s == Slot::Token(END)).unwrap_or(first.len().saturating_sub(1));
    Ok(z.get(0).get(eos as i64).unsqueeze(0).to_kind(Kind::Float).to_device(Device::Cpu))
}
