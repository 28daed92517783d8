//! What the node modules share: ComfyUI's common input declarations (resolution bound, seeds, cfg),
//! MASK and SIGMAS conversions, and the sampling call behind every sampler node.

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Args, Ctx, Float, Int, NodeError, Value};
use tch::Tensor;

use crate::sampling::ksampler::{sample, Guider, Request, SamplerSpec};

/// ComfyUI's MAX_RESOLUTION.
pub const MAX_RESOLUTION: i128 = 16384;

/// ComfyUI's seed range: 0 to 2^64 − 1.
pub fn seed() -> Int {
    Int::new(0).range(0, u64::MAX as i128)
}

/// ComfyUI's cfg input: 8, 0 to 100 in steps of 0.1.
pub fn cfg() -> Float {
    Float::new(8.0).range(0.0, 100.0).step(0.1)
}

/// A MASK input as `[b, 1, h, w]`, for a batch of `images`: one mask for all of them or one per image
/// (an error on the `mask` input otherwise).
pub fn mask_nchw(mask: &Tensor, images: i64) -> Result<Tensor, NodeError> {
    let s = mask.size();
    let m = mask.f_reshape([-1, 1, s[s.len() - 2], s[s.len() - 1]])?;
    let mb = m.size()[0];
    if mb != 1 && mb != images {
        return Err(NodeError::input("mask", format!("{mb} masks for {images} images; give one mask, or one per image")));
    }
    Ok(m)
}

/// The position of choice input `input`'s value among `choices` (the schema's list), or an error naming
/// the input where a value slipped past validation.
pub fn choice_index(a: &Args, input: &str, choices: &[&str]) -> Result<i64, NodeError> {
    let value = a.string(input)?;
    choices.iter().position(|c| *c == value).map(|i| i as i64).ok_or_else(|| NodeError::input(input, format!("{value:?} is not one of {}", choices.join(", "))))
}

/// A SIGMAS value from a list (stored as float32, as ComfyUI's).
pub fn sigmas_value(s: &[f64]) -> Value {
    let v: Vec<f32> = s.iter().map(|x| *x as f32).collect();
    Value::Sigmas(Shared(Tensor::from_slice(&v)))
}

/// `latent` with new samples (its noise mask and batch index kept).
pub fn latent_out(latent: &Latent, samples: Tensor) -> Value {
    Value::Latent(Latent { samples: Shared(samples), ..latent.clone() })
}

/// Samples the node's `latent_image` with `guider`, reporting the model calls; returns the new latent
/// and the last denoised estimate, both with the input's noise mask.
pub fn sample_latent(
    cx: &mut Ctx,
    a: &Args,
    guider: &Guider,
    sampler: &SamplerSpec,
    sigmas: &[f64],
    seed: i128,
    add_noise: bool,
) -> Result<(Value, Value), NodeError> {
    let latent = a.latent("latent_image")?;
    let label = cx.node_id.to_owned();
    let r = Request { guider, latent, seed, add_noise, sampler, sigmas, cancel: cx.cancel, label: &label, progress: cx.progress };
    let out = sample(&r)?;
    cx.messages.push(format!("{} steps of {}, {} model calls", sigmas.len().saturating_sub(1), sampler.name, out.model_calls));
    Ok((latent_out(latent, out.samples), latent_out(latent, out.denoised)))
}

/// The CFG guider of a node's `model`, `positive`, `negative` and `cfg` inputs.
pub fn cfg_guider(a: &Args) -> Result<Guider, NodeError> {
    Ok(Guider::cfg(a.handle("model")?, a.conditioning("positive")?, a.conditioning("negative")?, a.float("cfg")?))
}
