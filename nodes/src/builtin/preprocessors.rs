//! ComfyUI's image preprocessors for control hints: `Canny` (image/preprocessors) and `Morphology`,
//! shown as ImageMorphology (image/postprocessing), with kornia's results (see `filters.rs`).

use diffloom_core::value::Shared;
use diffloom_core::{Args, Combo, Ctx, Float, Int, Node, NodeError, Schema, Value, ValueType};

use crate::filters::{canny, morphology, MORPHOLOGY_OPS};

/// The IMAGE input as `[b, c, h, w]`.
fn nchw(a: &Args) -> Result<tch::Tensor, NodeError> {
    let image = a.image("image")?;
    if image.dim() != 4 {
        return Err(NodeError::input("image", format!("an IMAGE is [batch, height, width, channels], got {:?}", image.size())));
    }
    Ok(image.permute([0, 3, 1, 2]))
}

pub struct Canny;
impl Node for Canny {
    fn schema(&self) -> Schema {
        Schema::new("Canny", "image/preprocessors")
            .describe("Canny edges (white on black), as kornia finds them: the hint a canny ControlNet takes.")
            .input("image", ValueType::Image)
            .input("low_threshold", Float::new(0.4).range(0.01, 0.99).step(0.01))
            .input("high_threshold", Float::new(0.8).range(0.01, 0.99).step(0.01))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (low, high) = (a.float("low_threshold")?, a.float("high_threshold")?);
        let (_, edges) = canny(&nchw(a)?, low, high).map_err(|e| NodeError::input(if e.contains("threshold") { "low_threshold" } else { "image" }, e))?;
        Ok(vec![Value::Image(Shared(edges.repeat([1, 3, 1, 1]).permute([0, 2, 3, 1]).contiguous()))])
    }
}

pub struct Morphology;
impl Node for Morphology {
    fn schema(&self) -> Schema {
        Schema::new("Morphology", "image/postprocessing")
            .describe("Erodes, dilates, opens, closes (…) each channel with a square kernel, as kornia.morphology.")
            .input("image", ValueType::Image)
            .input("operation", Combo::of(&MORPHOLOGY_OPS))
            .input("kernel_size", Int::new(3).range(3, 999))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let out = morphology(&nchw(a)?, a.string("operation")?, a.i64("kernel_size")?).map_err(|e| NodeError::input("operation", e))?;
        Ok(vec![Value::Image(Shared(out.permute([0, 2, 3, 1]).contiguous()))])
    }
}
