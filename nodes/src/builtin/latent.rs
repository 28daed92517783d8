//! ComfyUI's `latent` category: empty latents and the VAE's way in and out.

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Args, Combo, Ctx, Float, Int, Node, NodeError, Schema, Value, ValueType};
use tch::{Device, Kind, Tensor};

use super::shared::MAX_RESOLUTION;
use crate::resample::{common_upscale, CROP_METHODS};
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
