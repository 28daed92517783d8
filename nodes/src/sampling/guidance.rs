//! The denoiser samplers call: the UNet with classifier-free guidance (cond and uncond in one batched
//! forward pass), the model-sampling conversions, and ComfyUI's latent noise mask.

use tch::{Kind, Tensor};

use diffloom_core::NodeError;

use super::model_sampling::ModelSampling;
use crate::models::unet::Unet;

/// What a sampler calls: the denoised estimate of `x` at noise level `sigma`.
pub trait Denoiser {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, NodeError>;
}

/// Keeps the unmasked part of the latent: before each model call the latent is re-noised to the current
/// sigma there, and the model's estimate there is replaced by the original (ComfyUI's
/// `KSamplerX0Inpaint`). `mask` is 1 where the image is resampled.
pub struct NoiseMask {
    /// `[b, c, h, w]` at latent resolution.
    pub mask: Tensor,
    pub latent_image: Tensor,
    pub noise: Tensor,
}

/// The guided UNet. `context` is `[2b, tokens, dim]` (cond rows then uncond rows) or `[b, …]` when cfg
/// is 1 and the uncond pass is skipped, as ComfyUI skips it.
pub struct CfgDenoiser<'a> {
    pub unet: &'a Unet,
    pub sampling: &'a ModelSampling,
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    pub cfg: f64,
    /// Extra input channels for inpainting UNets (mask and masked-image latent), `[b, 5, h, w]`.
    pub concat: Option<Tensor>,
    pub noise_mask: Option<NoiseMask>,
    /// Model calls so far (for NaN reports and benchmarks).
    pub calls: usize,
    /// Time spent in the UNet itself, so benchmarks can tell sampler overhead from model time.
    pub model_time: std::time::Duration,
}

/// Repeats token sequences to a common length (their least common multiple) so that conds of different
/// lengths can share a batch, as ComfyUI's `CONDCrossAttn.concat` does.
pub fn batch_conds(a: &Tensor, b: &Tensor) -> Tensor {
    let (la, lb) = (a.size()[1], b.size()[1]);
    if la == lb {
        return Tensor::cat(&[a, b], 0);
    }
    let lcm = la / gcd(la, lb) * lb;
    Tensor::cat(&[a.repeat([1, lcm / la, 1]), b.repeat([1, lcm / lb, 1])], 0)
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Denoiser for CfgDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, NodeError> {
        self.calls += 1;
        let x_in = match &self.noise_mask {
            Some(m) => {
                let noised = self.sampling.noise_scaling(sigma, &m.noise, &m.latent_image, false);
                x * &m.mask + noised * (m.mask.neg() + 1.0)
            }
            None => x.shallow_clone(),
        };
        let b = x_in.size()[0];
        let device = self.unet_device();
        let kind = Kind::Float;
        let batch = if self.uncond.is_some() { 2 } else { 1 };
        let xs = x_in.repeat([batch as i64, 1, 1, 1]);
        let mut model_in = self.sampling.calculate_input(sigma, &xs).to_device(device);
        if let Some(c) = &self.concat {
            model_in = Tensor::cat(&[model_in, c.repeat([batch as i64, 1, 1, 1]).to_device(device)], 1);
        }
        let sigmas = Tensor::from_slice(&vec![sigma as f32; (b * batch as i64) as usize]);
        let t = self.sampling.timestep(&sigmas).to_device(device);
        // ComfyUI batches the uncond rows first.
        let context = match &self.uncond {
            Some(u) => batch_conds(&u.repeat([b, 1, 1]), &self.cond.repeat([b, 1, 1])),
            None => self.cond.repeat([b, 1, 1]),
        };
        let started = std::time::Instant::now();
        let out = self.unet.forward(&model_in, &t, &context.to_device(device)).to_kind(kind).to_device(x.device());
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        self.model_time += started.elapsed();
        let denoised = self.sampling.calculate_denoised(sigma, &out, &xs);
        let guided = match self.uncond {
            Some(_) => {
                let parts = denoised.chunk(2, 0);
                let (uncond, cond) = (&parts[0], &parts[1]);
                // ComfyUI's cfg_function on the denoised estimates: uncond + (cond − uncond)·cfg.
                uncond + (cond - uncond) * self.cfg
            }
            None => denoised,
        };
        Ok(match &self.noise_mask {
            Some(m) => &guided * &m.mask + &m.latent_image * (m.mask.neg() + 1.0),
            None => guided,
        })
    }
}

impl CfgDenoiser<'_> {
    fn unet_device(&self) -> tch::Device {
        self.unet.device()
    }
}
