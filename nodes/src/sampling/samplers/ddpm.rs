//! `ddpm`: ancestral DDPM steps (Ho et al. 2020) in the VP form, converted from and back to the VE
//! latents k-diffusion samplers carry (ComfyUI's `generic_step_sampler` with `DDPMSampler_step`).

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Ddpm;

impl Sampler for Ddpm {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            let (sigma, sigma_prev) = (sigmas[i], sigmas[i + 1]);
            let denoised = model.denoise(&x, sigma)?;
            let eps = (&x - &denoised) / sigma;
            let x_vp = &x / (1.0 + sigma * sigma).sqrt();
            let ac = 1.0 / (sigma * sigma + 1.0);
            let ac_prev = 1.0 / (sigma_prev * sigma_prev + 1.0);
            let alpha = ac / ac_prev;
            let mut mu = (x_vp - eps * ((1.0 - alpha) / (1.0 - ac).sqrt())) * (1.0 / alpha).sqrt();
            if sigma_prev > 0.0 {
                mu = &mu + (cx.noise)(&mu)? * ((1.0 - alpha) * (1.0 - ac_prev) / (1.0 - ac)).sqrt();
                mu *= (1.0 + sigma_prev * sigma_prev).sqrt();
            }
            x = mu;
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
