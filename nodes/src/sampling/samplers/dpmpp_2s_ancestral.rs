//! `dpmpp_2s_ancestral`: DPM-Solver++(2S) single-step with ancestral noise.

use tch::Tensor;

use super::{ancestral_step, to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Dpmpp2sAncestral {
    pub eta: f64,
    pub s_noise: f64,
}

impl Sampler for Dpmpp2sAncestral {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let t = |s: f64| -s.ln();
        let sigma_of = |t: f64| (-t).exp();
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let (down, up) = ancestral_step(sigmas[i], sigmas[i + 1], self.eta);
            if down == 0.0 {
                // Euler to zero.
                let d = to_d(&x, sigmas[i], &denoised);
                x = &x + d * (down - sigmas[i]);
            } else {
                let (t_now, t_next) = (t(sigmas[i]), t(down));
                let r = 0.5;
                let h = t_next - t_now;
                let s = t_now + r * h;
                let x2 = &x * (sigma_of(s) / sigma_of(t_now)) - &denoised * (-h * r).exp_m1();
                let denoised2 = model.denoise(&x2, sigma_of(s))?;
                x = &x * (sigma_of(t_next) / sigma_of(t_now)) - denoised2 * (-h).exp_m1();
            }
            if sigmas[i + 1] > 0.0 {
                x = &x + (cx.noise)(&x)? * (self.s_noise * up);
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
