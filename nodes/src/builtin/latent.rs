//! ComfyUI's `latent` category: empty latents and the VAE's way in and out.

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Args, Combo, Ctx, Float, Int, Node, NodeError, Schema, Value, ValueType};
use tch::{Device, Kind, Tensor};

use super::image::MAX_RESOLUTION;
use super::loaders::part;
use crate::resample::{common_upscale, CROP_METHODS};
use crate::sd::{SdVae, VAE_FACTOR};

fn latent(samples: Tensor) -> Value {
    Value::Latent(Latent { samples: Shared(samples), noise_mask: None })
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
        let vae: &SdVae = part(a, "vae")?;
        let _guard = tch::no_grad_guard();
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
        let vae: &SdVae = part(a, "vae")?;
        let _guard = tch::no_grad_guard();
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
        let vae: &SdVae = part(a, "vae")?;
        let tile = a.i64("tile_size")?;
        // ComfyUI shrinks the overlap to a quarter of the tile when it is larger.
        let overlap = a.i64("overlap")?.min(tile / 4);
        let _guard = tch::no_grad_guard();
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
        let vae: &SdVae = part(a, "vae")?;
        let _guard = tch::no_grad_guard();
        Ok(vec![latent(vae.encode(a.image("pixels")?, Some((a.i64("tile_size")?, a.i64("overlap")?)))?)])
    }
}

/// ComfyUI's latent upscale methods (`bislerp` is not implemented yet).
pub const LATENT_METHODS: &[&str] = &["nearest-exact", "bilinear", "area", "bicubic"];

pub struct LatentUpscale;
impl Node for LatentUpscale {
    fn schema(&self) -> Schema {
        Schema::new("LatentUpscale", "latent")
            .describe("Resizes latents to a pixel size (0 for one side keeps the aspect ratio), as for hires-fix.")
            .input("samples", ValueType::Latent)
            .input("upscale_method", Combo::of(LATENT_METHODS))
            .input("width", Int::new(1024).range(0, MAX_RESOLUTION).step(8))
            .input("height", Int::new(1024).range(0, MAX_RESOLUTION).step(8))
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
        Ok(vec![Value::Latent(Latent { samples: Shared(out), noise_mask: l.noise_mask.clone() })])
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
        Ok(vec![Value::Latent(Latent { samples: Shared(out), noise_mask: l.noise_mask.clone() })])
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
        Ok(vec![Value::Latent(Latent { samples: l.samples.clone(), noise_mask: Some(Shared(mask)) })])
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
        Ok(vec![Value::Latent(Latent { samples: Shared(samples), noise_mask: mask })])
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
        let vae: &SdVae = part(a, "vae")?;
        let pixels = a.image("pixels")?;
        let ps = pixels.size();
        let (h, w) = (ps[1], ps[2]);
        let ms = a.mask("mask")?.size();
        let mask = a.mask("mask")?.f_reshape([-1, 1, ms[ms.len() - 2], ms[ms.len() - 1]])?.f_upsample_bilinear2d([h, w], false, None, None)?;
        // The same centre crop to multiples of 8 as the pixels get in the encoder.
        let (ch, cw) = (h / VAE_FACTOR * VAE_FACTOR, w / VAE_FACTOR * VAE_FACTOR);
        let (oy, ox) = ((h % VAE_FACTOR) / 2, (w % VAE_FACTOR) / 2);
        let pixels = pixels.f_narrow(1, oy, ch)?.f_narrow(2, ox, cw)?;
        let mask = mask.f_narrow(2, oy, ch)?.f_narrow(3, ox, cw)?;
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
        let _guard = tch::no_grad_guard();
        let samples = vae.encode(&pixels, None)?;
        let noise_mask = grown.f_narrow(2, 0, ch)?.f_narrow(3, 0, cw)?.f_round()?;
        Ok(vec![Value::Latent(Latent { samples: Shared(samples), noise_mask: Some(Shared(noise_mask)) })])
    }
}
