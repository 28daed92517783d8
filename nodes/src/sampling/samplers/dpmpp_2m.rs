//! `dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep method in log-SNR time.

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Dpmpp2m;

impl Sampler for Dpmpp2m {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let t = |s: f64| -s.ln();
        let sigma_of = |t: f64| (-t).exp();
        let mut old: Option<Tensor> = None;
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let (t_now, t_next) = (t(sigmas[i]), t(sigmas[i + 1]));
            let h = t_next - t_now;
            let factor = sigma_of(t_next) / sigma_of(t_now);
            x = match (&old, sigmas[i + 1] == 0.0) {
                (Some(prev), false) => {
                    let h_last = t_now - t(sigmas[i - 1]);
                    let r = h_last / h;
                    let denoised_d = &denoised * (1.0 + 1.0 / (2.0 * r)) - prev * (1.0 / (2.0 * r));
                    &x * factor - denoised_d * (-h).exp_m1()
                }
                _ => &x * factor - &denoised * (-h).exp_m1(),
            };
            old = Some(denoised);
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
