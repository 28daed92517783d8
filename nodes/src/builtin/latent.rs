//! ComfyUI's `latent` category: empty latents and the VAE's way in and out.

use std::collections::HashMap;

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Args, Bool, Combo, Ctx, Float, Int, Locator, Node, NodeError, Schema, Str, Value, ValueType};
use tch::{Device, Kind, Tensor};

use super::shared::{choice_index, latent_out, MAX_RESOLUTION};
use crate::resample::{common_upscale, CROP_METHODS};
use crate::sampling::conds::repeat_to_batch;
use crate::sd::{SdVae, VAE_FACTOR};
use crate::tiles::fade_edge;

fn latent(samples: Tensor) -> Value {
    Value::Latent(Latent { samples: Shared(samples), noise_mask: None, batch_index: None })
}

pub struct EmptyLatentImage;
impl Node for EmptyLatentImage {
    fn schema(&self) -> Schema {
        Schema::new("EmptyLatentImage", "latent")
            .input("width", Int::new(512).range(16, MAX_RESOLUTION).step(8))
            .input("height", Int::new(512).range(16, MAX_RESOLUTION).step(8))
            .input("batch_size", Int::new(1).range(1, 4096))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (w, h, b) = (a.i64("width")?, a.i64("height")?, a.i64("batch_size")?);
        Ok(vec![latent(Tensor::f_zeros([b, 4, h / VAE_FACTOR, w / VAE_FACTOR], (Kind::Float, Device::Cpu))?)])
    }
}

pub struct VAEDecode;
impl Node for VAEDecode {
    fn schema(&self) -> Schema {
        Schema::new("VAEDecode", "latent").input("samples", ValueType::Latent).input("vae", ValueType::Vae).output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = a.handle("vae")?;
        Ok(vec![Value::Image(Shared(vae.decode(&a.latent("samples")?.samples, None)?))])
    }
}

pub struct VAEEncode;
impl Node for VAEEncode {
    fn schema(&self) -> Schema {
        Schema::new("VAEEncode", "latent")
            .describe("Encodes images to latents: the mean of the VAE's distribution (no random draw), as ComfyUI.")
            .input("pixels", ValueType::Image)
            .input("vae", ValueType::Vae)
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = a.handle("vae")?;
        Ok(vec![latent(vae.encode(a.image("pixels")?, None)?)])
    }
}

pub struct VAEDecodeTiled;
impl Node for VAEDecodeTiled {
    fn schema(&self) -> Schema {
        Schema::new("VAEDecodeTiled", "_for_testing")
            .describe("Decodes in overlapping tiles to bound memory (temporal_* only matter for video models).")
            .input("samples", ValueType::Latent)
            .input("vae", ValueType::Vae)
            .input("tile_size", Int::new(512).range(64, 4096).step(32))
            .input("overlap", Int::new(64).range(0, 4096).step(32))
            .input("temporal_size", Int::new(64).range(8, 4096).step(4))
            .input("temporal_overlap", Int::new(8).range(4, 4096).step(4))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = a.handle("vae")?;
        let tile = a.i64("tile_size")?;
        // ComfyUI shrinks the overlap to a quarter of the tile when it is larger.
        let overlap = a.i64("overlap")?.min(tile / 4);
        let image = vae.decode(&a.latent("samples")?.samples, Some((tile / VAE_FACTOR, overlap / VAE_FACTOR)))?;
        Ok(vec![Value::Image(Shared(image))])
    }
}

pub struct VAEEncodeTiled;
impl Node for VAEEncodeTiled {
    fn schema(&self) -> Schema {
        Schema::new("VAEEncodeTiled", "_for_testing")
            .describe("Encodes in overlapping tiles to bound memory (temporal_* only matter for video models).")
            .input("pixels", ValueType::Image)
            .input("vae", ValueType::Vae)
            .input("tile_size", Int::new(512).range(64, 4096).step(64))
            .input("overlap", Int::new(64).range(0, 4096).step(32))
            .input("temporal_size", Int::new(64).range(8, 4096).step(4))
            .input("temporal_overlap", Int::new(8).range(4, 4096).step(4))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = a.handle("vae")?;
        Ok(vec![latent(vae.encode(a.image("pixels")?, Some((a.i64("tile_size")?, a.i64("overlap")?)))?)])
    }
}

/// ComfyUI's latent upscale methods.
pub const LATENT_METHODS: &[&str] = &["nearest-exact", "bilinear", "area", "bicubic", "bislerp"];

pub struct LatentUpscale;
impl Node for LatentUpscale {
    fn schema(&self) -> Schema {
        Schema::new("LatentUpscale", "latent")
            .describe("Resizes latents to a pixel size (0 for one side keeps the aspect ratio), as for hires-fix.")
            .input("samples", ValueType::Latent)
            .input("upscale_method", Combo::of(LATENT_METHODS))
            .input("width", Int::new(512).range(0, MAX_RESOLUTION).step(8))
            .input("height", Int::new(512).range(0, MAX_RESOLUTION).step(8))
            .input("crop", Combo::of(CROP_METHODS))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        let (mut w, mut h) = (a.i64("width")?, a.i64("height")?);
        if w == 0 && h == 0 {
            return Ok(vec![Value::Latent(l.clone())]);
        }
        let s = l.samples.size();
        let (lh, lw) = (s[2] as f64, s[3] as f64);
        // ComfyUI: at least 64 pixels per side; a 0 side follows the aspect ratio.
        if w == 0 {
            h = h.max(64);
            w = ((lw * h as f64 / lh).round_ties_even() as i64).max(64);
        } else if h == 0 {
            w = w.max(64);
            h = ((lh * w as f64 / lw).round_ties_even() as i64).max(64);
        } else {
            (w, h) = (w.max(64), h.max(64));
        }
        let out = common_upscale(&l.samples, w / VAE_FACTOR, h / VAE_FACTOR, a.string("upscale_method")?, a.string("crop")?)?;
        Ok(vec![Value::Latent(Latent { samples: Shared(out), ..l.clone() })])
    }
}

pub struct LatentUpscaleBy;
impl Node for LatentUpscaleBy {
    fn schema(&self) -> Schema {
        Schema::new("LatentUpscaleBy", "latent")
            .input("samples", ValueType::Latent)
            .input("upscale_method", Combo::of(LATENT_METHODS))
            .input("scale_by", Float::new(1.5).range(0.01, 8.0))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        let s = l.samples.size();
        let f = a.float("scale_by")?;
        let (w, h) = (((s[3] as f64) * f).round_ties_even().max(1.0) as i64, ((s[2] as f64) * f).round_ties_even().max(1.0) as i64);
        let out = common_upscale(&l.samples, w, h, a.string("upscale_method")?, "disabled")?;
        Ok(vec![Value::Latent(Latent { samples: Shared(out), ..l.clone() })])
    }
}

pub struct SetLatentNoiseMask;
impl Node for SetLatentNoiseMask {
    fn schema(&self) -> Schema {
        Schema::new("SetLatentNoiseMask", "latent/inpaint")
            .describe("Only the masked part (1) of the latent is resampled; the rest is kept.")
            .input("samples", ValueType::Latent)
            .input("mask", ValueType::Mask)
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        let m = a.mask("mask")?;
        let (b, mb) = (l.samples.size()[0], m.size()[0]);
        if mb != 1 && mb != b {
            return Err(NodeError::input("mask", format!("a batch of {mb} masks does not match the latent's batch of {b}")));
        }
        let s = m.size();
        let mask = m.f_reshape([-1, 1, s[s.len() - 2], s[s.len() - 1]])?;
        Ok(vec![Value::Latent(Latent { noise_mask: Some(Shared(mask)), ..l.clone() })])
    }
}

pub struct RepeatLatentBatch;
impl Node for RepeatLatentBatch {
    fn schema(&self) -> Schema {
        Schema::new("RepeatLatentBatch", "latent/batch")
            .input("samples", ValueType::Latent)
            .input("amount", Int::new(1).range(1, 64))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        let n = a.i64("amount")?;
        let samples = l.samples.f_repeat([n, 1, 1, 1])?;
        let mask = match &l.noise_mask {
            Some(m) if m.size()[0] > 1 => Some(Shared(m.f_repeat([n, 1, 1, 1])?)),
            other => other.clone(),
        };
        // Repeats of indexed items continue the indices after the batch's span (ComfyUI: offset
        // max − min + 1 per repeat).
        let batch_index = l.batch_index.as_ref().map(|bi| {
            let span = bi.iter().max().unwrap_or(&0) - bi.iter().min().unwrap_or(&0) + 1;
            (0..n).flat_map(|r| bi.iter().map(move |i| i + r * span)).collect()
        });
        Ok(vec![Value::Latent(Latent { samples: Shared(samples), noise_mask: mask, batch_index })])
    }
}

/// ComfyUI's VAEEncodeForInpaint: the masked pixels are set to grey before encoding, and the mask,
/// grown by `grow_mask_by` pixels, becomes the latent's noise mask.
pub struct VAEEncodeForInpaint;
impl Node for VAEEncodeForInpaint {
    fn schema(&self) -> Schema {
        Schema::new("VAEEncodeForInpaint", "latent/inpaint")
            .input("pixels", ValueType::Image)
            .input("vae", ValueType::Vae)
            .input("mask", ValueType::Mask)
            .input("grow_mask_by", Int::new(6).range(0, 64))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = a.handle("vae")?;
        let pixels = a.image("pixels")?;
        let (pixels, mask) = super::conditioning::crop_with_mask(pixels, a.mask("mask")?)?;
        let (ch, cw) = (pixels.size()[1], pixels.size()[2]);
        let grow = a.i64("grow_mask_by")?;
        let grown = if grow == 0 {
            mask.shallow_clone()
        } else {
            let kernel = Tensor::f_ones([1, 1, grow, grow], (Kind::Float, Device::Cpu))?;
            // ComfyUI pads by ceil((grow − 1) / 2), which is grow / 2 in integers.
            let pad = grow / 2;
            mask.f_round()?.f_conv2d(&kernel, None::<Tensor>, [1, 1], [pad, pad], [1, 1], 1)?.f_clamp(0.0, 1.0)?
        };
        let keep = mask.f_round()?.f_neg()?.f_add_scalar(1.0)?.f_squeeze_dim(1)?.f_unsqueeze(-1)?;
        let pixels = pixels.f_sub_scalar(0.5)?.f_mul(&keep)?.f_add_scalar(0.5)?;
        let samples = vae.encode(&pixels, None)?;
        let noise_mask = grown.f_narrow(2, 0, ch)?.f_narrow(3, 0, cw)?.f_round()?;
        Ok(vec![Value::Latent(Latent { samples: Shared(samples), noise_mask: Some(Shared(noise_mask)), batch_index: None })])
    }
}

/// ComfyUI's LatentComposite: `samples_from` pasted into `samples_to` at (x, y) (pixels, floored to the
/// 8-pixel grid), clipped at the right and bottom; with `feather`, a linear fade over that many pixels
/// on the edges that lie inside `samples_to`.
pub struct LatentComposite;
impl Node for LatentComposite {
    fn schema(&self) -> Schema {
        let px = || Int::new(0).range(0, MAX_RESOLUTION).step(8);
        Schema::new("LatentComposite", "latent")
            .input("samples_to", ValueType::Latent)
            .input("samples_from", ValueType::Latent)
            .input("x", px())
            .input("y", px())
            .input("feather", px())
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let to = a.latent("samples_to")?;
        let from = &a.latent("samples_from")?.samples;
        let (x, y, feather) = (a.i64("x")? / VAE_FACTOR, a.i64("y")? / VAE_FACTOR, a.i64("feather")? / VAE_FACTOR);
        let (ts, fs) = (to.samples.size(), from.size());
        if ts[1] != fs[1] || (fs[0] != 1 && fs[0] != ts[0]) {
            return Err(NodeError::input(
                "samples_from",
                format!("a latent of shape {fs:?} cannot be pasted into one of shape {ts:?} (same channels; batch 1 or {})", ts[0]),
            ));
        }
        if x >= ts[3] || y >= ts[2] {
            return Ok(vec![Value::Latent(to.clone())]);
        }
        let (fh, fw) = (fs[2].min(ts[2] - y), fs[3].min(ts[3] - x));
        let src = from.f_narrow(2, 0, fh)?.f_narrow(3, 0, fw)?;
        let out = to.samples.f_to_dtype(to.samples.kind(), false, true)?;
        let mut region = out.f_narrow(2, y, fh)?.f_narrow(3, x, fw)?;
        let mask = Tensor::f_ones([1, 1, fh, fw], (Kind::Float, Device::Cpu))?;
        for (dim, start, len, full) in [(2, y, fh, ts[2]), (3, x, fw, ts[3])] {
            if start != 0 {
                fade_edge(&mask, dim, feather, false)?;
            }
            if start + len < full {
                fade_edge(&mask, dim, feather, true)?;
            }
        }
        let blended = src.f_mul(&mask)?.f_add(&region.f_mul(&mask.f_neg()?.f_add_scalar(1.0)?)?)?;
        region.f_copy_(&blended)?;
        Ok(vec![Value::Latent(Latent { samples: Shared(out), ..to.clone() })])
    }
}

/// ComfyUI's LatentFromBatch: items `batch_index .. batch_index + length` (clamped to the batch). They
/// remember their index, so a sampler gives them the noise they had in the whole batch.
pub struct LatentFromBatch;
impl Node for LatentFromBatch {
    fn schema(&self) -> Schema {
        Schema::new("LatentFromBatch", "latent/batch")
            .input("samples", ValueType::Latent)
            .input("batch_index", Int::new(0).range(0, 63))
            .input("length", Int::new(1).range(1, 64))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        let b = l.samples.size()[0];
        let start = a.i64("batch_index")?.min(b - 1);
        let len = a.i64("length")?.min(b - start);
        let samples = l.samples.f_narrow(0, start, len)?;
        let noise_mask = match &l.noise_mask {
            Some(m) if m.size()[0] > 1 => {
                let m = crate::sampling::conds::repeat_to_batch(m, b);
                Some(Shared(m.f_narrow(0, start, len)?))
            }
            other => other.clone(),
        };
        let batch_index = match &l.batch_index {
            Some(bi) => bi.iter().skip(start as usize).take(len as usize).copied().collect(),
            None => (start..start + len).collect(),
        };
        Ok(vec![Value::Latent(Latent { samples: Shared(samples), noise_mask, batch_index: Some(batch_index) })])
    }
}

/// Python's `seq[start:stop]` on a length-`n` axis as (start, length): negative positions count from the
/// end, both clamp.
fn py_range(start: i64, stop: i64, n: i64) -> (i64, i64) {
    let at = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) };
    let (s, e) = (at(start), at(stop));
    (s, (e - s).max(0))
}

fn flip_dim(a: &Args, x_dim: i64) -> Result<i64, NodeError> {
    Ok(if a.string("flip_method")?.starts_with('x') { x_dim } else { x_dim + 1 })
}

/// ComfyUI's rotation choices; the index is the number of clockwise quarter turns.
pub const ROTATIONS: &[&str] = &["none", "90 degrees", "180 degrees", "270 degrees"];

/// ComfyUI's flip choices: "x-axis" turns upside down, "y-axis" mirrors left to right.
pub const FLIPS: &[&str] = &["x-axis: vertically", "y-axis: horizontally"];

/// ComfyUI's LatentFlip; the noise mask is not flipped (as ComfyUI).
pub struct LatentFlip;
impl Node for LatentFlip {
    fn schema(&self) -> Schema {
        Schema::new("LatentFlip", "latent/transform")
            .input("samples", ValueType::Latent)
            .input("flip_method", Combo::of(FLIPS))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        Ok(vec![latent_out(l, l.samples.f_flip([flip_dim(a, 2)?])?)])
    }
}

/// ComfyUI's LatentRotate: clockwise quarter turns; the noise mask is not rotated (as ComfyUI).
pub struct LatentRotate;
impl Node for LatentRotate {
    fn schema(&self) -> Schema {
        Schema::new("LatentRotate", "latent/transform")
            .input("samples", ValueType::Latent)
            .input("rotation", Combo::of(ROTATIONS))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        let k = choice_index(a, "rotation", ROTATIONS)?;
        Ok(vec![latent_out(l, l.samples.f_rot90(k, [3, 2])?.f_contiguous()?)])
    }
}

/// ComfyUI's LatentCrop: x and y floored to the 8-pixel grid and kept at least 8 latent pixels from the
/// right and bottom edges, then Python slicing (a latent under 8 wide gives a negative start, which
/// counts from the end, as ComfyUI). The noise mask is not cropped.
pub struct LatentCrop;
impl Node for LatentCrop {
    fn schema(&self) -> Schema {
        let px = || Int::new(0).range(0, MAX_RESOLUTION).step(8);
        Schema::new("LatentCrop", "latent/transform")
            .input("samples", ValueType::Latent)
            .input("width", Int::new(512).range(64, MAX_RESOLUTION).step(8))
            .input("height", Int::new(512).range(64, MAX_RESOLUTION).step(8))
            .input("x", px())
            .input("y", px())
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        let s = l.samples.size();
        let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
        let x = (a.i64("x")? / 8).min(w - 8);
        let y = (a.i64("y")? / 8).min(h - 8);
        let (x0, xl) = py_range(x, x + a.i64("width")? / 8, w);
        let (y0, yl) = py_range(y, y + a.i64("height")? / 8, h);
        let nd = s.len() as i64;
        Ok(vec![latent_out(l, l.samples.f_narrow(nd - 2, y0, yl)?.f_narrow(nd - 1, x0, xl)?.f_contiguous()?)])
    }
}

pub struct LatentMultiply;
impl Node for LatentMultiply {
    fn schema(&self) -> Schema {
        Schema::new("LatentMultiply", "latent/advanced")
            .input("samples", ValueType::Latent)
            .input("multiplier", Float::new(1.0).range(-10.0, 10.0).step(0.01))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        Ok(vec![latent_out(l, l.samples.f_mul_scalar(a.float("multiplier")?)?)])
    }
}

/// ComfyUI's `reshape_latent_to`: `l` resized (bilinear, centre crop) to `target`'s size when its
/// channels or size differ (a channel mismatch stays and fails later, as ComfyUI), then repeated or cut
/// to `target`'s batch when `repeat`.
fn reshape_latent_to(target: &Tensor, l: &Tensor, repeat: bool) -> Result<Tensor, NodeError> {
    let (ts, ls) = (target.size(), l.size());
    let l = if ts[1..] != ls[1..] { common_upscale(l, ts[ts.len() - 1], ts[ts.len() - 2], "bilinear", "center")? } else { l.shallow_clone() };
    Ok(if repeat { repeat_to_batch(&l, ts[0]) } else { l })
}

/// Both latents' samples, the second reshaped to the first; the error names `samples2`.
fn two_latents(a: &Args) -> Result<(&Latent, Tensor, Tensor), NodeError> {
    let l1 = a.latent("samples1")?;
    let s2 = reshape_latent_to(&l1.samples, &a.latent("samples2")?.samples, true)?;
    Ok((l1, l1.samples.shallow_clone(), s2))
}

fn mismatch(e: tch::TchError) -> NodeError {
    NodeError::input("samples2", format!("does not fit samples1: {e}"))
}

/// ComfyUI's LatentAdd: samples2 resized and batch-repeated to samples1, whose noise mask and batch
/// index are kept.
pub struct LatentAdd;
impl Node for LatentAdd {
    fn schema(&self) -> Schema {
        Schema::new("LatentAdd", "latent/advanced")
            .input("samples1", ValueType::Latent)
            .input("samples2", ValueType::Latent)
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (l1, s1, s2) = two_latents(a)?;
        Ok(vec![latent_out(l1, s1.f_add(&s2).map_err(mismatch)?)])
    }
}

/// ComfyUI's LatentSubtract: samples1 − samples2, as LatentAdd.
pub struct LatentSubtract;
impl Node for LatentSubtract {
    fn schema(&self) -> Schema {
        Schema::new("LatentSubtract", "latent/advanced")
            .input("samples1", ValueType::Latent)
            .input("samples2", ValueType::Latent)
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (l1, s1, s2) = two_latents(a)?;
        Ok(vec![latent_out(l1, s1.f_sub(&s2).map_err(mismatch)?)])
    }
}

/// ComfyUI's LatentInterpolate: a blend of the per-pixel channel directions, rescaled by the blended
/// norms. ComfyUI's quirk is kept: the norms `[B, h, w]` are divided into `[B, C, h, w]` without
/// keepdim, so the batch axis meets the channel axis: right for a batch of 1, channel c divided by item
/// c's norm for a batch of C, and a size error for any other batch.
pub struct LatentInterpolate;
impl Node for LatentInterpolate {
    fn schema(&self) -> Schema {
        Schema::new("LatentInterpolate", "latent/advanced")
            .input("samples1", ValueType::Latent)
            .input("samples2", ValueType::Latent)
            .input("ratio", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (l1, s1, s2) = two_latents(a)?;
        let r = a.float("ratio")?;
        let norm = |t: &Tensor| t.f_linalg_norm(2, [1i64].as_slice(), false, None::<Kind>);
        let unit = |t: &Tensor, m: &Tensor| -> Result<Tensor, NodeError> {
            let batch =
                |e: tch::TchError| NodeError::input("samples1", format!("ComfyUI's LatentInterpolate only takes a batch of 1 (or of one per channel): {e}"));
            Ok(t.f_div(m).map_err(batch)?.f_nan_to_num(None, None, None)?)
        };
        let (m1, m2) = (norm(&s1)?, norm(&s2)?);
        let t = unit(&s1, &m1)?.f_mul_scalar(r)?.f_add(&unit(&s2, &m2)?.f_mul_scalar(1.0 - r)?)?;
        let st = unit(&t, &norm(&t)?)?;
        let out = st.f_mul(&m1.f_mul_scalar(r)?.f_add(&m2.f_mul_scalar(1.0 - r)?)?)?;
        Ok(vec![latent_out(l1, out)])
    }
}

/// ComfyUI's LatentBatch (deprecated there): samples2 resized to samples1 and appended. The batch
/// indices are concatenated without offset (two plain latents get [0, 0], the same noise), and
/// samples1's noise mask is kept as it is.
pub struct LatentBatch;
impl Node for LatentBatch {
    fn schema(&self) -> Schema {
        Schema::new("LatentBatch", "latent/batch").input("samples1", ValueType::Latent).input("samples2", ValueType::Latent).output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (l1, l2) = (a.latent("samples1")?, a.latent("samples2")?);
        let s2 = reshape_latent_to(&l1.samples, &l2.samples, false)?;
        let samples = Tensor::f_cat(&[l1.samples.shallow_clone(), s2], 0).map_err(mismatch)?;
        let indices = |l: &Latent| l.batch_index.clone().unwrap_or_else(|| (0..l.samples.size()[0]).collect());
        let batch_index = [indices(l1), indices(l2)].concat();
        Ok(vec![Value::Latent(Latent { samples: Shared(samples), noise_mask: l1.noise_mask.clone(), batch_index: Some(batch_index) })])
    }
}

/// ComfyUI's LatentBlend: `samples1 * blend_factor + samples2 * (1 − blend_factor)`, samples2 resized
/// (bicubic, centre crop) when its shape differs; its batch must be 1 or samples1's (not repeated).
pub struct LatentBlend;
impl Node for LatentBlend {
    fn schema(&self) -> Schema {
        Schema::new("LatentBlend", "_for_testing")
            .input("samples1", ValueType::Latent)
            .input("samples2", ValueType::Latent)
            .input("blend_factor", Float::new(0.5).range(0.0, 1.0).step(0.01))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l1 = a.latent("samples1")?;
        let (s1, s2) = (&l1.samples, &a.latent("samples2")?.samples);
        let size = s1.size();
        let s2 = if size != s2.size() { common_upscale(s2, size[size.len() - 1], size[size.len() - 2], "bicubic", "center")? } else { s2.shallow_clone() };
        let f = a.float("blend_factor")?;
        let out = s1.f_mul_scalar(f)?.f_add(&s2.f_mul_scalar(1.0 - f)?).map_err(mismatch)?;
        Ok(vec![latent_out(l1, out)])
    }
}

/// ComfyUI's LatentBatchSeedBehavior: "random" drops the batch index (each item its own noise),
/// "fixed" gives every item the first item's index (the same noise for all).
pub struct LatentBatchSeedBehavior;
impl Node for LatentBatchSeedBehavior {
    fn schema(&self) -> Schema {
        Schema::new("LatentBatchSeedBehavior", "latent/advanced")
            .input("samples", ValueType::Latent)
            .input("seed_behavior", Combo::of(&["random", "fixed"]).default("fixed"))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let l = a.latent("samples")?;
        let batch_index = match a.string("seed_behavior")? {
            "random" => None,
            _ => {
                let first = l.batch_index.as_ref().and_then(|b| b.first().copied()).unwrap_or(0);
                Some(vec![first; l.samples.size()[0] as usize])
            }
        };
        Ok(vec![Value::Latent(Latent { batch_index, ..l.clone() })])
    }
}

/// ComfyUI's LatentCompositeMasked: `source` pasted into `destination` at (x, y) (floored to the 8-pixel
/// grid) through `mask` (bilinear to the source's size), the source optionally resized to the
/// destination first; source and mask are repeated or cut to the destination's batch. The
/// destination's noise mask and batch index are kept.
pub struct LatentCompositeMasked;
impl Node for LatentCompositeMasked {
    fn schema(&self) -> Schema {
        let px = || Int::new(0).range(0, MAX_RESOLUTION).step(8);
        Schema::new("LatentCompositeMasked", "latent")
            .input("destination", ValueType::Latent)
            .input("source", ValueType::Latent)
            .input("x", px())
            .input("y", px())
            .input("resize_source", Bool(false))
            .optional("mask", ValueType::Mask)
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let dest_latent = a.latent("destination")?;
        let dest = dest_latent.samples.copy();
        let ds = dest.size();
        let mut src = a.latent("source")?.samples.shallow_clone();
        if a.boolean("resize_source")? {
            src = src.f_upsample_bilinear2d([ds[2], ds[3]], false, None, None)?;
        }
        let src = repeat_to_batch(&src, ds[0]);
        let ss = src.size();
        let (left, top) = (a.i64("x")?.min(ds[3] * 8) / 8, a.i64("y")?.min(ds[2] * 8) / 8);
        let mask = match a.opt_mask("mask")? {
            Some(m) => {
                let s = m.size();
                let m = m.f_reshape([-1, 1, s[s.len() - 2], s[s.len() - 1]])?.f_upsample_bilinear2d([ss[2], ss[3]], false, None, None)?;
                repeat_to_batch(&m, ss[0])
            }
            None => src.f_ones_like()?,
        };
        let (vw, vh) = ((ds[3] - left).min(ss[3]), (ds[2] - top).min(ss[2]));
        if vw > 0 && vh > 0 {
            let m = mask.f_narrow(2, 0, vh)?.f_narrow(3, 0, vw)?;
            let mut region = dest.f_narrow(2, top, vh)?.f_narrow(3, left, vw)?;
            let src_part =
                m.f_mul(&src.f_narrow(2, 0, vh)?.f_narrow(3, 0, vw)?).map_err(|e| NodeError::input("source", format!("does not fit the destination: {e}")))?;
            let mixed = src_part.f_add(&m.f_ones_like()?.f_sub(&m)?.f_mul(&region)?)?;
            region.f_copy_(&mixed).map_err(|e| NodeError::input("source", format!("does not fit the destination: {e}")))?;
        }
        Ok(vec![latent_out(dest_latent, dest)])
    }
}

/// The key of ComfyUI's `.latent` files holding the samples, and the (empty) marker of the current
/// format, whose absence means the old one (samples stored multiplied by SD's 0.18215).
const LATENT_KEY: &str = "latent_tensor";
const LATENT_VERSION_KEY: &str = "latent_format_version_0";

/// ComfyUI's SaveLatent: the samples (not the noise mask or batch index) as
/// `<output>/<prefix>_<NNNNN>_.latent`, a safetensors file with `latent_tensor` and an empty
/// `latent_format_version_0` marker, and the run's `prompt`/`workflow` (and diffloom's graph) as metadata.
pub struct SaveLatent;
impl Node for SaveLatent {
    fn schema(&self) -> Schema {
        Schema::new("SaveLatent", "_for_testing")
            .describe("Saves the latent's samples as a numbered .latent file (ComfyUI's safetensors format) in the output directory; never overwrites a file.")
            .input("samples", ValueType::Latent)
            .input("filename_prefix", Str::new("latents/ComfyUI"))
            .doc("file name prefix; may contain subfolders")
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let samples = &a.latent("samples")?.samples.0;
        if !matches!(samples.kind(), Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(NodeError::input("samples", format!("cannot save {:?} samples (float32, float16 or bfloat16 only)", samples.kind())));
        }
        let tensors =
            vec![(LATENT_KEY.to_owned(), samples.f_contiguous()?), (LATENT_VERSION_KEY.to_owned(), Tensor::f_zeros([0], (Kind::Float, Device::Cpu))?)];
        // ComfyUI writes `prompt` (empty without one) and each extra_pnginfo entry (`workflow`); A1111's
        // `parameters` describe an image, not a latent.
        let mut metadata: HashMap<String, String> = (cx.image_texts)(0, 0).into_iter().filter(|(k, _)| k != "parameters").collect();
        metadata.entry("prompt".to_owned()).or_default();
        let prefix = a.string("filename_prefix")?;
        let dir = cx.output_dir.to_path_buf();
        crate::imageio::check_confined(cx, &dir, prefix)?;
        let bytes = crate::checkpoint::synthetic::serialize(&tensors, Some(metadata)).map_err(|e| NodeError::input("samples", e))?;
        let path = crate::imageio::save_numbered(&dir, prefix, "latent", |f| std::io::Write::write_all(f, &bytes).map_err(|e| e.to_string()))?;
        cx.messages.push(format!("wrote {}", path.display()));
        let rel = path.strip_prefix(&dir).unwrap_or(&path);
        let subfolder = rel.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let filename = rel.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        cx.ui.insert("latents".to_owned(), serde_json::json!([{"filename": filename, "subfolder": subfolder, "type": "output"}]));
        Ok(vec![])
    }
}

/// ComfyUI's LoadLatent: a `.latent` file from the input directory (ComfyUI's `[output]`/`[temp]`
/// annotations allowed), its samples as float32; a file without the `latent_format_version_0` marker is
/// in the old format and is divided by 0.18215.
pub struct LoadLatent;
impl Node for LoadLatent {
    fn schema(&self) -> Schema {
        Schema::new("LoadLatent", "_for_testing")
            .describe("Loads a .latent file (as SaveLatent writes) from the input directory.")
            .input("latent", Str::required())
            .doc("file name in the input directory (subfolders and ComfyUI's `[input]`/`[output]` annotations allowed), or a path")
            .output("LATENT", ValueType::Latent)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        super::image::file_token(files, "latent", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let path = cx.files.image("latent", a.string("latent")?)?;
        let bytes = crate::imageio::read(&path)?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| NodeError::file(&path, format!("not a .latent (safetensors) file: {e}")))?;
        let view = file.tensor(LATENT_KEY).map_err(|_| NodeError::file(&path, format!("no {LATENT_KEY:?} tensor: not a .latent file")))?;
        let kind = crate::checkpoint::safetensors::dtype_kind(view.dtype())
            .ok_or_else(|| NodeError::file(&path, format!("{LATENT_KEY:?} has the unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|d| *d as i64).collect();
        let samples = Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?;
        let old_format = !file.names().contains(&LATENT_VERSION_KEY);
        // As ComfyUI: `.float() * multiplier`, the multiply done even at 1.
        let multiplier = if old_format { 1.0 / 0.18215 } else { 1.0 };
        Ok(vec![latent(samples.f_mul_scalar(multiplier)?)])
    }
}
