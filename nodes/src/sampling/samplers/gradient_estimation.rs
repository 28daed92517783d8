//! `gradient_estimation` and `gradient_estimation_cfg_pp`: Euler steps corrected by the change of the
//! slope since the last step, scaled by γ − 1 (Permenter & Yuan, "Interpreting and improving diffusion
//! models from an optimization perspective"; ComfyUI's `sample_gradient_estimation`, γ = 2).

use tch::Tensor;

use super::{to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct GradientEstimation {
    pub ge_gamma: f64,
    pub cfg_pp: bool,
}

impl Sampler for GradientEstimation {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let mut old_d: Option<Tensor> = None;
        for i in 0..n {
            let (denoised, d) = match self.cfg_pp {
                true => {
                    let (denoised, uncond) = model.denoise_with_uncond(&x, sigmas[i])?;
                    let d = to_d(&x, sigmas[i], &uncond);
                    (denoised, d)
                }
                false => {
                    let denoised = model.denoise(&x, sigmas[i])?;
                    let d = to_d(&x, sigmas[i], &denoised);
                    (denoised, d)
                }
            };
            let dt = sigmas[i + 1] - sigmas[i];
            if sigmas[i + 1] == 0.0 {
                x = denoised;
            } else {
                x = if self.cfg_pp { &denoised + &d * sigmas[i + 1] } else { &x + &d * dt };
                if let Some(old) = &old_d {
                    x = &x + (&d - old) * ((self.ge_gamma - 1.0) * dt);
                }
            }
            old_d = Some(d);
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
