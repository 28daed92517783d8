//! ComfyUI's `conditioning` category: prompt encoding, the CLIP layer choice, combining entries, areas
//! and masks, and the inputs of inpainting models.

use std::path::Path;

use diffloom_core::value::{tensor_bytes, Area, CondEntry, Latent, Shared};
use diffloom_core::{Args, Bool, Combo, Ctx, Float, Handle, Int, Node, NodeError, Schema, Str, Value, ValueType};
use tch::Tensor;

use super::shared::{mask_nchw, MAX_RESOLUTION};
use crate::models::clip_vision::{clip_preprocess, ClipVisionModel, ClipVisionOutput};
use crate::models::style_adapter::StyleAdapter;
use crate::sd::{EmbeddingDir, SdClip, SdVae, VAE_FACTOR};

pub struct CLIPTextEncode;
impl Node for CLIPTextEncode {
    fn schema(&self) -> Schema {
        Schema::new("CLIPTextEncode", "conditioning")
            .describe(
                "Encodes a prompt: (text:1.2) weights, \\( escapes, embedding:name textual inversions, \
                       prompts of any length in 77-token windows, as ComfyUI.",
            )
            .input("text", Str::required().multiline())
            .input("clip", ValueType::Clip)
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let clip: &SdClip = a.handle("clip")?;
        let dir = EmbeddingDir { dirs: cx.files.folders.dirs("embeddings").map(Path::to_path_buf).collect(), family: clip.family };
        let cond = clip.encode(a.string("text")?, Some(&dir as &dyn crate::prompt::EmbeddingSource))?;
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
        let clip: &SdClip = a.handle("clip")?;
        let layer = a.i64("stop_at_clip_layer")?;
        let label = format!("{} (layer {layer})", clip.model.config.hidden_size);
        Ok(vec![Value::Clip(Handle::new(SdClip { layer: Some(layer), ..clip.clone() }, 0, label))])
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
        let mut c = a.conditioning("conditioning_1")?;
        c.extend(a.conditioning("conditioning_2")?);
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
        let from = a.conditioning("conditioning_from")?;
        let Some(first) = from.first() else { return Err(NodeError::input("conditioning_from", "the conditioning is empty")) };
        let out = a
            .conditioning("conditioning_to")?
            .into_iter()
            .map(|e| {
                let t = tch::Tensor::f_cat(&[e.cross_attn.0.shallow_clone(), first.cross_attn.0.shallow_clone()], 1)?;
                Ok(diffloom_core::value::CondEntry { cross_attn: diffloom_core::value::Shared(t), ..e })
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
        let out = a
            .conditioning("conditioning")?
            .into_iter()
            .map(|e| diffloom_core::value::CondEntry {
                cross_attn: diffloom_core::value::Shared(e.cross_attn.0.zeros_like()),
                pooled: e.pooled.as_ref().map(|p| diffloom_core::value::Shared(p.0.zeros_like())),
                ..e
            })
            .collect();
        Ok(vec![Value::Conditioning(out)])
    }
}

/// ComfyUI's ConditioningSetTimestepRange: the entries apply only from `start` to `end` of the
/// sampling (fractions of the schedule; outside it a side without entries predicts 0, as in ComfyUI).
pub struct ConditioningSetTimestepRange;
impl Node for ConditioningSetTimestepRange {
    fn schema(&self) -> Schema {
        Schema::new("ConditioningSetTimestepRange", "advanced/conditioning")
            .input("conditioning", ValueType::Conditioning)
            .input("start", Float::new(0.0).range(0.0, 1.0).step(0.001))
            .input("end", Float::new(1.0).range(0.0, 1.0).step(0.001))
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let range = (a.float("start")?, a.float("end")?);
        map_entries(a, |e| e.timestep_range = Some(range))
    }
}

/// ComfyUI's ConditioningAverage: each entry of `conditioning_to` blended with the first entry of
/// `conditioning_from` (its tokens cut or zero-padded to the same length), `to` weighted by
/// `conditioning_to_strength`.
pub struct ConditioningAverage;
impl Node for ConditioningAverage {
    fn schema(&self) -> Schema {
        Schema::new("ConditioningAverage", "conditioning")
            .input("conditioning_to", ValueType::Conditioning)
            .input("conditioning_from", ValueType::Conditioning)
            .input("conditioning_to_strength", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let w = a.float("conditioning_to_strength")?;
        let from = a.conditioning("conditioning_from")?;
        let Some(first) = from.first() else {
            return Err(NodeError::input("conditioning_from", "the conditioning is empty"));
        };
        if from.len() > 1 {
            cx.messages.push("warning: conditioning_from has more than one entry; only the first is used (as in ComfyUI)".into());
        }
        let out = a
            .conditioning("conditioning_to")?
            .into_iter()
            .map(|e| {
                let (t1, t0) = (&e.cross_attn.0, &first.cross_attn.0);
                let (n1, n0) = (t1.size()[1], t0.size()[1]);
                let t0 = if n0 >= n1 {
                    t0.narrow(1, 0, n1)
                } else {
                    let pad = Tensor::zeros([t0.size()[0], n1 - n0, t0.size()[2]], (t0.kind(), t0.device()));
                    Tensor::cat(&[t0.shallow_clone(), pad], 1)
                };
                if t0.size()[2] != t1.size()[2] {
                    return Err(NodeError::input(
                        "conditioning_from",
                        format!("its token width {} differs from conditioning_to's {} (another text encoder?)", t0.size()[2], t1.size()[2]),
                    ));
                }
                let pooled = match (&e.pooled, &first.pooled) {
                    (Some(to), Some(fr)) => Some(Shared(&to.0 * w + &fr.0 * (1.0 - w))),
                    (None, Some(fr)) => Some(fr.clone()),
                    (to, None) => to.clone(),
                };
                Ok(CondEntry { cross_attn: Shared(t1 * w + t0 * (1.0 - w)), pooled, ..e })
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        Ok(vec![Value::Conditioning(out)])
    }
}

/// Every entry of `conditioning` with `set` applied.
fn map_entries(a: &Args, set: impl Fn(&mut CondEntry)) -> Result<Vec<Value>, NodeError> {
    let mut entries = a.conditioning("conditioning")?;
    entries.iter_mut().for_each(set);
    Ok(vec![Value::Conditioning(entries)])
}

fn strength() -> Float {
    Float::new(1.0).range(0.0, 10.0).step(0.01)
}

/// ComfyUI's ConditioningSetArea: the entries apply to a rectangle (pixels, floored to the latent's
/// 8-pixel grid), their predictions weighted by `strength` against overlapping entries and faded in
/// over up to 8 latent pixels at edges inside the image.
pub struct ConditioningSetArea;
impl Node for ConditioningSetArea {
    fn schema(&self) -> Schema {
        Schema::new("ConditioningSetArea", "conditioning")
            .input("conditioning", ValueType::Conditioning)
            .input("width", Int::new(64).range(64, MAX_RESOLUTION).step(8))
            .input("height", Int::new(64).range(64, MAX_RESOLUTION).step(8))
            .input("x", Int::new(0).range(0, MAX_RESOLUTION).step(8))
            .input("y", Int::new(0).range(0, MAX_RESOLUTION).step(8))
            .input("strength", strength())
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let f = VAE_FACTOR;
        let area = Area::Latent { h: a.i64("height")? / f, w: a.i64("width")? / f, y: a.i64("y")? / f, x: a.i64("x")? / f };
        let s = a.float("strength")?;
        map_entries(a, |e| {
            e.area = Some(area);
            e.strength = s;
            e.area_from_mask = false;
        })
    }
}

/// ConditioningSetArea in fractions of the image's sides, resolved when sampling.
pub struct ConditioningSetAreaPercentage;
impl Node for ConditioningSetAreaPercentage {
    fn schema(&self) -> Schema {
        let frac = |d: f64| Float::new(d).range(0.0, 1.0).step(0.01);
        Schema::new("ConditioningSetAreaPercentage", "conditioning")
            .input("conditioning", ValueType::Conditioning)
            .input("width", frac(1.0))
            .input("height", frac(1.0))
            .input("x", frac(0.0))
            .input("y", frac(0.0))
            .input("strength", strength())
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let area = Area::Fraction { h: a.float("height")?, w: a.float("width")?, y: a.float("y")?, x: a.float("x")? };
        let s = a.float("strength")?;
        map_entries(a, |e| {
            e.area = Some(area);
            e.strength = s;
            e.area_from_mask = false;
        })
    }
}

pub struct ConditioningSetAreaStrength;
impl Node for ConditioningSetAreaStrength {
    fn schema(&self) -> Schema {
        Schema::new("ConditioningSetAreaStrength", "conditioning")
            .input("conditioning", ValueType::Conditioning)
            .input("strength", strength())
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = a.float("strength")?;
        map_entries(a, |e| e.strength = s)
    }
}

/// ComfyUI's ConditioningSetMask: the entries' predictions weighted per pixel by the mask (resized to
/// the latent) times `strength`; with "mask bounds" the model also runs only on the mask's bounding box.
pub struct ConditioningSetMask;
impl Node for ConditioningSetMask {
    fn schema(&self) -> Schema {
        Schema::new("ConditioningSetMask", "conditioning")
            .input("conditioning", ValueType::Conditioning)
            .input("mask", ValueType::Mask)
            .input("strength", strength())
            .input("set_cond_area", Combo::of(&["default", "mask bounds"]))
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let mask = a.mask("mask")?;
        let mask = if mask.dim() == 2 { Shared(mask.f_unsqueeze(0)?) } else { mask.clone() };
        let s = a.float("strength")?;
        let bounds = a.string("set_cond_area")? != "default";
        map_entries(a, |e| {
            e.mask = Some(mask.clone());
            e.mask_strength = s;
            e.area_from_mask = bounds;
        })
    }
}

/// ComfyUI's InpaintModelConditioning: the image with the masked pixels greyed is encoded for
/// inpainting UNets' extra channels (kept on every entry with the mask); the latent is the whole
/// image's, with the mask as its noise mask when `noise_mask` is set (what standard UNets use).
pub struct InpaintModelConditioning;
impl Node for InpaintModelConditioning {
    fn schema(&self) -> Schema {
        Schema::new("InpaintModelConditioning", "conditioning/inpaint")
            .input("positive", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("vae", ValueType::Vae)
            .input("pixels", ValueType::Image)
            .input("mask", ValueType::Mask)
            .input("noise_mask", Bool(true))
            .doc("also set the latent's noise mask, so the sampler keeps the unmasked part")
            .output("positive", ValueType::Conditioning)
            .output("negative", ValueType::Conditioning)
            .output("latent", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = a.handle("vae")?;
        let pixels = a.image("pixels")?;
        let (crop, mask) = crop_with_mask(pixels, a.mask("mask")?)?;
        let keep = mask.f_round()?.f_neg()?.f_add_scalar(1.0)?.f_squeeze_dim(1)?.f_unsqueeze(-1)?;
        let masked = crop.f_sub_scalar(0.5)?.f_mul(&keep)?.f_add_scalar(0.5)?;
        let concat = Shared(vae.encode(&masked, None)?);
        let samples = vae.encode(pixels, None)?;
        let mask = Shared(mask);
        let with = |input: &str| -> Result<Value, NodeError> {
            let mut entries = a.conditioning(input)?;
            for e in &mut entries {
                e.concat_latent = Some(concat.clone());
                e.concat_mask = Some(mask.clone());
            }
            Ok(Value::Conditioning(entries))
        };
        let noise_mask = a.boolean("noise_mask")?.then(|| mask.clone());
        Ok(vec![with("positive")?, with("negative")?, Value::Latent(Latent { samples: Shared(samples), noise_mask, batch_index: None })])
    }
}

/// ComfyUI's InstructPixToPixConditioning: the image's latent rides on every entry as the extra input
/// of an InstructPix2Pix UNet; the latent to sample is zeros of its shape.
pub struct InstructPixToPixConditioning;
impl Node for InstructPixToPixConditioning {
    fn schema(&self) -> Schema {
        Schema::new("InstructPixToPixConditioning", "conditioning/instructpix2pix")
            .input("positive", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("vae", ValueType::Vae)
            .input("pixels", ValueType::Image)
            .output("positive", ValueType::Conditioning)
            .output("negative", ValueType::Conditioning)
            .output("latent", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = a.handle("vae")?;
        // (The encoder centre-crops to multiples of 8, as the node does first.)
        let concat = Shared(vae.encode(a.image("pixels")?, None)?);
        let with = |input: &str| -> Result<Value, NodeError> {
            let mut entries = a.conditioning(input)?;
            for e in &mut entries {
                e.concat_latent = Some(concat.clone());
            }
            Ok(Value::Conditioning(entries))
        };
        let latent = Latent { samples: Shared(concat.zeros_like()), noise_mask: None, batch_index: None };
        Ok(vec![with("positive")?, with("negative")?, Value::Latent(latent)])
    }
}

/// The pixels and the mask (resized to them, `[b, 1, h, w]`), both centre-cropped to multiples of 8
/// as the VAE encoder crops. One mask for all images or one per image.
pub(crate) fn crop_with_mask(pixels: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor), NodeError> {
    let ps = pixels.size();
    let (h, w) = (ps[1], ps[2]);
    let mask = mask_nchw(mask, ps[0])?.f_upsample_bilinear2d([h, w], false, None, None)?;
    let (ch, cw) = (h / VAE_FACTOR * VAE_FACTOR, w / VAE_FACTOR * VAE_FACTOR);
    let (oy, ox) = ((h % VAE_FACTOR) / 2, (w % VAE_FACTOR) / 2);
    Ok((pixels.f_narrow(1, oy, ch)?.f_narrow(2, ox, cw)?, mask.f_narrow(2, oy, ch)?.f_narrow(3, ox, cw)?))
}

/// ComfyUI's CLIPVisionEncode: `clip_preprocess` (resize to the model's input size, centre crop or
/// not, 8-bit quantisation, CLIP normalisation), then the vision model.
pub struct CLIPVisionEncode;
impl Node for CLIPVisionEncode {
    fn schema(&self) -> Schema {
        Schema::new("CLIPVisionEncode", "conditioning")
            .describe("Encodes images with a CLIP vision model (image_embeds, last and penultimate hidden states).")
            .input("clip_vision", ValueType::ClipVision)
            .input("image", ValueType::Image)
            .input("crop", Combo::of(&["center", "none"]))
            .output("CLIP_VISION_OUTPUT", ValueType::ClipVisionOutput)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &ClipVisionModel = a.handle("clip_vision")?;
        let image = a.image("image")?;
        let c = &model.config;
        let pixels = clip_preprocess(&image.to_device(cx.device), c.image_size, c.image_mean, c.image_std, a.string("crop")? == "center")
            .map_err(|e| NodeError::input("image", format!("cannot resize for the CLIP vision model: {e}")))?;
        let out = model.forward(&pixels.to_kind(tch::Kind::Float));
        let bytes = [&out.image_embeds, &out.last_hidden_state, &out.penultimate_hidden_states].iter().map(|t| tensor_bytes(t)).sum();
        let source = a.any("clip_vision")?.handle().map(|h| h.label().to_owned()).unwrap_or_default();
        let label = format!("{:?} from {source}", out.image_embeds.size());
        Ok(vec![Value::ClipVisionOutput(Handle::new(out, bytes, label))])
    }
}

/// ComfyUI's unCLIPConditioning: appends the image embeddings, with strength and noise augmentation,
/// to every entry's unCLIP list, which an SD 2.1 unCLIP model turns into its class-label input when
/// sampling (see `sampling/adm.rs`). Strength 0 returns the conditioning unchanged.
pub struct UnClipConditioning;
impl Node for UnClipConditioning {
    fn schema(&self) -> Schema {
        Schema::new("unCLIPConditioning", "conditioning")
            .describe("Adds a CLIP vision output's image embeddings to the conditioning, for SD 2.1 unCLIP models.")
            .input("conditioning", ValueType::Conditioning)
            .input("clip_vision_output", ValueType::ClipVisionOutput)
            .input("strength", Float::new(1.0).range(-10.0, 10.0).step(0.01))
            .input("noise_augmentation", Float::new(0.0).range(0.0, 1.0).step(0.01))
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let conditioning = a.conditioning("conditioning")?;
        let strength = a.float("strength")?;
        if strength == 0.0 {
            return Ok(vec![Value::Conditioning(conditioning)]);
        }
        let vision: &ClipVisionOutput = a.handle("clip_vision_output")?;
        let unclip = diffloom_core::value::UnclipCond {
            image_embeds: Shared(vision.image_embeds.to_device(tch::Device::Cpu)),
            strength,
            noise_augmentation: a.float("noise_augmentation")?,
        };
        let out = conditioning
            .into_iter()
            .map(|mut e| {
                e.unclip.push(unclip.clone());
                e
            })
            .collect();
        Ok(vec![Value::Conditioning(out)])
    }
}

/// ComfyUI's StyleModelApply: the style model's tokens for every image of the CLIP vision output, in
/// one row (`[1, images × tokens, width]`), appended to each entry's text states.
pub struct StyleModelApply;
impl Node for StyleModelApply {
    fn schema(&self) -> Schema {
        Schema::new("StyleModelApply", "conditioning/style_model")
            .describe(
                "Appends a style model's tokens to each conditioning entry. multiply scales them by strength; attn_bias builds \
                 an attention mask that SD 1.x/2.x UNets ignore (in ComfyUI too), so the tokens go in at full strength.",
            )
            .input("conditioning", ValueType::Conditioning)
            .input("style_model", ValueType::StyleModel)
            .input("clip_vision_output", ValueType::ClipVisionOutput)
            .input("strength", Float::new(1.0).range(0.0, 10.0).step(0.001))
            .input("strength_type", Combo::of(&["multiply", "attn_bias"]))
            .output("CONDITIONING", ValueType::Conditioning)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let style: &StyleAdapter = a.handle("style_model")?;
        let vision: &ClipVisionOutput = a.handle("clip_vision_output")?;
        let width = vision.last_hidden_state.size()[2];
        if width != style.config.width {
            return Err(NodeError::input(
                "clip_vision_output",
                format!("the CLIP vision states are {width} wide, the style model reads {}-wide states", style.config.width),
            ));
        }
        let tokens = style.forward(&vision.last_hidden_state).flatten(0, 1).unsqueeze(0);
        let tokens = match a.string("strength_type")? {
            "multiply" => tokens * a.float("strength")?,
            // ComfyUI stores log(strength) as an `attention_mask` on the entry; only Flux-type models
            // read it, SD 1.x/2.x's extra_conds drop it.
            _ => tokens,
        };
        let out = a
            .conditioning("conditioning")?
            .into_iter()
            .map(|e| {
                let txt = &e.cross_attn.0;
                let (s, t) = (txt.size(), tokens.size());
                if s[2] != t[2] {
                    return Err(NodeError::input("style_model", format!("the style tokens are {} wide, the conditioning's text states {}", t[2], s[2])));
                }
                if s[0] != 1 {
                    return Err(NodeError::input(
                        "conditioning",
                        format!("a batch of {} text states; the style tokens are one row (ComfyUI's cat fails too)", s[0]),
                    ));
                }
                let t = Tensor::f_cat(&[txt.shallow_clone(), tokens.to_device(txt.device()).to_kind(txt.kind())], 1)?;
                Ok(CondEntry { cross_attn: Shared(t), ..e })
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        Ok(vec![Value::Conditioning(out)])
    }
}
