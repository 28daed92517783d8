//! `euler_cfg_pp` and `euler_ancestral_cfg_pp`: Euler steps in CFG++ form (Chung et al. 2024): the
//! step direction comes from the unconditional estimate, the landing point from the guided one
//! (ComfyUI's `sample_euler_ancestral_cfg_pp`; `euler_cfg_pp` is it with eta = 0). For SD's VE
//! schedule α = 1 throughout.

use tch::Tensor;

use super::{ancestral_step, to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct EulerAncestralCfgPp {
    pub eta: f64,
    pub s_noise: f64,
}

impl Sampler for EulerAncestralCfgPp {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            let (denoised, uncond) = model.denoise_with_uncond(&x, sigmas[i])?;
            if sigmas[i + 1] == 0.0 {
                x = denoised;
            } else {
                let d = to_d(&x, sigmas[i], &uncond);
                let (down, up) = ancestral_step(sigmas[i], sigmas[i + 1], self.eta);
                x = &denoised + d * down;
                if self.eta > 0.0 && self.s_noise > 0.0 {
                    x = &x + (cx.noise)(&x)? * (self.s_noise * up);
                }
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}

/// SamplerEulerCFGpp's "alternative" version (ComfyUI's `sample_euler_pp`): Euler steps whose slope
/// replaces the guided estimate's noise by the unconditional one's.
pub struct EulerCfgPpAlternative;

impl Sampler for EulerCfgPpAlternative {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            let (denoised, uncond) = model.denoise_with_uncond(&x, sigmas[i])?;
            let d = to_d(&(&x - &denoised + uncond), sigmas[i], &denoised);
            x = &x + d * (sigmas[i + 1] - sigmas[i]);
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
