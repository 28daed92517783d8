//! `heun`: Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler on the last step to 0.

use tch::Tensor;

use super::{to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Heun;

impl Sampler for Heun {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let d = to_d(&x, sigmas[i], &denoised);
            let dt = sigmas[i + 1] - sigmas[i];
            if sigmas[i + 1] == 0.0 {
                x = &x + d * dt;
            } else {
                let x2 = &x + &d * dt;
                let denoised2 = model.denoise(&x2, sigmas[i + 1])?;
                let d2 = to_d(&x2, sigmas[i + 1], &denoised2);
                x = &x + (d + d2) / 2.0 * dt;
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
