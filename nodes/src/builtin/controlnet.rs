//! ComfyUI's `conditioning/controlnet` category: applying a ControlNet or T2I-Adapter, with its hint
//! image, to conditioning entries (chained onto any applied before).

use diffloom_core::value::CondEntry;
use diffloom_core::{Args, Ctx, Float, Handle, Node, NodeError, Schema, Value, ValueType};
use tch::Tensor;

use crate::control::{AppliedControl, ControlNetValue};

/// The CONTROL_NET input and the hint image as `[b, c, h, w]`.
fn control_and_hint(a: &Args) -> Result<(&ControlNetValue, Tensor), NodeError> {
    let control: &ControlNetValue = a.handle("control_net")?;
    let image = a.image("image")?;
    if image.dim() != 4 {
        return Err(NodeError::input("image", format!("an IMAGE is [batch, height, width, channels], got {:?}", image.size())));
    }
    Ok((control, image.permute([0, 3, 1, 2])))
}

fn applied(value: &ControlNetValue, hint: &Tensor, strength: f64, range: (f64, f64), previous: Option<Handle>) -> Handle {
    let label = format!("{} × {strength}", value.name);
    Handle::new(AppliedControl::new(value, hint.shallow_clone(), strength, range, previous), 0, label)
}

pub struct ControlNetApplyAdvanced;
impl Node for ControlNetApplyAdvanced {
    fn schema(&self) -> Schema {
        Schema::new("ControlNetApplyAdvanced", "conditioning/controlnet")
            .describe(
                "Guides sampling with a ControlNet or T2I-Adapter and a hint image (edges, depth, pose, …) between \
                 start_percent and end_percent of the steps; chains onto ControlNets applied before.",
            )
            .input("positive", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("control_net", ValueType::ControlNet)
            .input("image", ValueType::Image)
            .input("strength", Float::new(1.0).range(0.0, 10.0).step(0.01))
            .input("start_percent", Float::new(0.0).range(0.0, 1.0).step(0.001))
            .input("end_percent", Float::new(1.0).range(0.0, 1.0).step(0.001))
            .optional("vae", ValueType::Vae)
            .doc("used only by ControlNets that work on latents (SD3/Flux ones, which diffloom does not run)")
            .output("positive", ValueType::Conditioning)
            .output("negative", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (positive, negative) = (a.conditioning("positive")?, a.conditioning("negative")?);
        let strength = a.float("strength")?;
        if strength == 0.0 {
            return Ok(vec![Value::Conditioning(positive), Value::Conditioning(negative)]);
        }
        let (value, hint) = control_and_hint(a)?;
        let range = (a.float("start_percent")?, a.float("end_percent")?);
        // One application per ControlNet the entries had before (by identity), shared by both sides,
        // so that positive and negative entries still batch together.
        let mut made: Vec<(Option<Handle>, Handle)> = Vec::new();
        let mut apply = |entries: Vec<CondEntry>| -> Vec<CondEntry> {
            entries
                .into_iter()
                .map(|e| {
                    let prev = e.control.clone();
                    let found = made.iter().find(|(p, _)| match (p, &prev) {
                        (Some(x), Some(y)) => x.same(y),
                        (x, y) => x.is_none() && y.is_none(),
                    });
                    let control = match found {
                        Some((_, c)) => c.clone(),
                        None => {
                            let c = applied(value, &hint, strength, range, prev.clone());
                            made.push((prev, c.clone()));
                            c
                        }
                    };
                    CondEntry { control: Some(control), control_apply_to_uncond: false, ..e }
                })
                .collect()
        };
        let positive = apply(positive);
        let negative = apply(negative);
        Ok(vec![Value::Conditioning(positive), Value::Conditioning(negative)])
    }
}

/// The deprecated single-conditioning form, still in many saved workflows: the ControlNet goes on the
/// positive entries and, at sampling, onto negative entries that have none.
pub struct ControlNetApply;
impl Node for ControlNetApply {
    fn schema(&self) -> Schema {
        Schema::new("ControlNetApply", "conditioning/controlnet")
            .describe("Deprecated form of ControlNetApplyAdvanced (whole run; the negative gets the positive's ControlNet).")
            .input("conditioning", ValueType::Conditioning)
            .input("control_net", ValueType::ControlNet)
            .input("image", ValueType::Image)
            .input("strength", Float::new(1.0).range(0.0, 10.0).step(0.01))
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let conditioning = a.conditioning("conditioning")?;
        let strength = a.float("strength")?;
        if strength == 0.0 {
            return Ok(vec![Value::Conditioning(conditioning)]);
        }
        let (value, hint) = control_and_hint(a)?;
        // Each entry gets its own application, as ComfyUI copies the ControlNet per entry.
        let out = conditioning
            .into_iter()
            .map(|e| {
                let control = applied(value, &hint, strength, (0.0, 1.0), e.control.clone());
                CondEntry { control: Some(control), control_apply_to_uncond: true, ..e }
            })
            .collect();
        Ok(vec![Value::Conditioning(out)])
    }
}
