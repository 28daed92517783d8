//! Noise seeded as ComfyUI seeds it, so seeds carry over. Every draw comes from a generator of its own
//! ([`Generator`]), so nothing else that draws random numbers meanwhile (another run, a model patch)
//! can shift the sequence.
//!
//! - The initial latent noise is `torch.manual_seed(seed); torch.randn(shape)` on the CPU, whatever
//!   the device (`comfy.sample.prepare_noise`).
//! - The per-step noise of ancestral and other stochastic samplers comes from k-diffusion's
//!   `default_noise_sampler` as ComfyUI 0.8 has it (since ComfyUI PR #11528): a private generator on the
//!   latent's device, seeded with `seed + 1` on the CPU (so step noise is not a copy of the initial
//!   noise) and with `seed` on CUDA, drawing in the latent's dtype on that device.

use diffloom_aten::Generator;
use diffloom_core::NodeError;
use tch::{Device, Kind, Tensor};

/// The seed as libtorch takes it: the u64 bit pattern (ComfyUI seeds go up to 2^64 − 1).
pub fn seed_bits(seed: i128) -> u64 {
    seed as u64
}

/// ComfyUI's initial noise for a latent of `shape`. With `batch_index` (latents taken from a batch),
/// noise is drawn per index up to the largest and picked, so a latent keeps its noise when split off.
pub fn initial_noise(seed: i128, shape: &[i64], batch_index: Option<&[i64]>) -> Tensor {
    let mut g = Generator::cpu(seed_bits(seed));
    match batch_index {
        None => g.randn_f32(shape),
        Some(inds) => {
            let mut one = shape.to_vec();
            one[0] = 1;
            let max = inds.iter().copied().max().unwrap_or(0);
            let draws: Vec<Tensor> = (0..=max).map(|_| g.randn_f32(&one)).collect();
            Tensor::cat(&inds.iter().map(|i| draws[*i as usize].shallow_clone()).collect::<Vec<_>>(), 0)
        }
    }
}

/// The seed `default_noise_sampler` gives its generator on `device`: `seed + 1` on the CPU, `seed`
/// elsewhere. At seed 2^64 − 1 the CPU seed wraps to 0, where ComfyUI raises an overflow error.
pub fn step_seed(seed: i128, device: Device) -> u64 {
    match device {
        Device::Cpu => seed_bits(seed).wrapping_add(1),
        _ => seed_bits(seed),
    }
}

/// Per-step noise for a sampling run whose model is on `device`: each call draws fresh standard normal
/// noise shaped like its argument, in its dtype, on `device` (ComfyUI's `default_noise_sampler`, whose
/// latent lives on the model's device), and hands it over on the argument's device.
pub fn step_noise(seed: i128, device: Device) -> Result<impl FnMut(&Tensor) -> Result<Tensor, NodeError>, NodeError> {
    let mut g = Generator::new(device, step_seed(seed, device)).map_err(|e| NodeError::Failed(format!("cannot make a random generator on {device:?}: {e}")))?;
    Ok(move |x: &Tensor| {
        let kind = match x.kind() {
            k @ (Kind::Half | Kind::BFloat16 | Kind::Double) => k,
            _ => Kind::Float,
        };
        let noise = g.randn(&x.size(), kind).map_err(|e| NodeError::Failed(format!("drawing step noise: {e}")))?;
        Ok(noise.to_device(x.device()))
    })
}
