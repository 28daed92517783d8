//! `euler_ancestral`: an Euler step down to σ_down, then fresh noise up to the next sigma.

use tch::Tensor;

use super::{ancestral_step, to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct EulerAncestral {
    pub eta: f64,
    pub s_noise: f64,
}

impl Sampler for EulerAncestral {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let (down, up) = ancestral_step(sigmas[i], sigmas[i + 1], self.eta);
            if down == 0.0 {
                x = denoised;
            } else {
                let d = to_d(&x, sigmas[i], &denoised);
                x = &x + d * (down - sigmas[i]) + (cx.noise)(&x)? * (self.s_noise * up);
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
