//! `dpm_2`: the DPM-Solver-2 style midpoint method in log sigma (k-diffusion's `sample_dpm_2`).

use tch::Tensor;

use super::{to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Dpm2;

impl Sampler for Dpm2 {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let d = to_d(&x, sigmas[i], &denoised);
            if sigmas[i + 1] == 0.0 {
                x = &x + d * (sigmas[i + 1] - sigmas[i]);
            } else {
                // The midpoint between sigma and the next, in log space.
                let sigma_mid = ((sigmas[i].ln() + sigmas[i + 1].ln()) / 2.0).exp();
                let x2 = &x + &d * (sigma_mid - sigmas[i]);
                let denoised2 = model.denoise(&x2, sigma_mid)?;
                let d2 = to_d(&x2, sigma_mid, &denoised2);
                x = &x + d2 * (sigmas[i + 1] - sigmas[i]);
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
