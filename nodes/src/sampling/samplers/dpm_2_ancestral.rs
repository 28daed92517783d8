//! `dpm_2_ancestral`: `dpm_2` down to σ_down, then fresh noise up to the next sigma.

use tch::Tensor;

use super::{ancestral_step, to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Dpm2Ancestral {
    pub eta: f64,
    pub s_noise: f64,
}

impl Sampler for Dpm2Ancestral {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let (down, up) = ancestral_step(sigmas[i], sigmas[i + 1], self.eta);
            let d = to_d(&x, sigmas[i], &denoised);
            if down == 0.0 {
                x = &x + d * (down - sigmas[i]);
            } else {
                let sigma_mid = ((sigmas[i].ln() + down.ln()) / 2.0).exp();
                let x2 = &x + &d * (sigma_mid - sigmas[i]);
                let denoised2 = model.denoise(&x2, sigma_mid)?;
                let d2 = to_d(&x2, sigma_mid, &denoised2);
                x = &x + d2 * (down - sigmas[i]);
                x = &x + (cx.noise)(&x)? * (self.s_noise * up);
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
