//! `dpmpp_3m_sde`: DPM-Solver++(3M) SDE with Brownian-tree noise (ComfyUI's form).

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::brownian::BrownianNoise;
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Dpmpp3mSde {
    pub eta: f64,
    pub s_noise: f64,
    /// The `_gpu` variant: Brownian noise drawn on the model's device (ComfyUI's `cpu=False` tree).
    pub gpu: bool,
}

impl Sampler for Dpmpp3mSde {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let mut bt = BrownianNoise::new(&x.size(), sigmas, cx.seed, cx.brownian_device(self.gpu))?;
        let (mut d1_prev, mut d2_prev): (Option<Tensor>, Option<Tensor>) = (None, None);
        let (mut h1, mut h2): (Option<f64>, Option<f64>) = (None, None);
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let mut h = None;
            if sigmas[i + 1] == 0.0 {
                x = denoised.shallow_clone();
            } else {
                let (ls, lt) = (-sigmas[i].ln(), -sigmas[i + 1].ln());
                let hh = lt - ls;
                let h_eta = hh * (self.eta + 1.0);
                let alpha_t = sigmas[i + 1] * lt.exp();
                x = &x * (sigmas[i + 1] / sigmas[i] * (-hh * self.eta).exp()) + &denoised * (alpha_t * -(-h_eta).exp_m1());
                match (&d1_prev, &d2_prev, h1, h2) {
                    (Some(dn1), Some(dn2), Some(h_1), Some(h_2)) => {
                        let (r0, r1) = (h_1 / hh, h_2 / hh);
                        let d1_0 = (&denoised - dn1) / r0;
                        let d1_1 = (dn1 - dn2) / r1;
                        let d1 = &d1_0 + (&d1_0 - &d1_1) * (r0 / (r0 + r1));
                        let d2 = (&d1_0 - &d1_1) / (r0 + r1);
                        let phi_2 = (-h_eta).exp_m1() / h_eta + 1.0;
                        let phi_3 = phi_2 / h_eta - 0.5;
                        x = &x + d1 * (alpha_t * phi_2) - d2 * (alpha_t * phi_3);
                    }
                    (Some(dn1), _, Some(h_1), _) => {
                        let r = h_1 / hh;
                        let d = (&denoised - dn1) / r;
                        let phi_2 = (-h_eta).exp_m1() / h_eta + 1.0;
                        x = &x + d * (alpha_t * phi_2);
                    }
                    _ => {}
                }
                if self.eta > 0.0 && self.s_noise > 0.0 {
                    let scale = sigmas[i + 1] * (-(-2.0 * hh * self.eta).exp_m1()).sqrt() * self.s_noise;
                    x = &x + bt.noise(sigmas[i], sigmas[i + 1])?.to_device(x.device()) * scale;
                }
                h = Some(hh);
            }
            d2_prev = d1_prev.take();
            d1_prev = Some(denoised);
            h2 = h1;
            h1 = h;
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
