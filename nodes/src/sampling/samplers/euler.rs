//! `euler`: Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn).

use tch::Tensor;

use super::{to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Euler;

impl Sampler for Euler {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let d = to_d(&x, sigmas[i], &denoised);
            x = &x + d * (sigmas[i + 1] - sigmas[i]);
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
