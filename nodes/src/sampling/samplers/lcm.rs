//! `lcm`: Latent Consistency Model sampling: jump to the denoised estimate, re-noise to the next sigma.

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Lcm;

impl Sampler for Lcm {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            x = model.denoise(&x, sigmas[i])?;
            if sigmas[i + 1] > 0.0 {
                x = &x + (cx.noise)(&x)? * sigmas[i + 1];
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
