//! `dpmpp_2m_sde` and `dpmpp_2m_sde_heun`: DPM-Solver++(2M) SDE, midpoint or Heun form, with Brownian-tree noise (ComfyUI's form with
//! the α_t factors; its last step to 0 returns the denoised estimate).

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::brownian::BrownianNoise;
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Dpmpp2mSde {
    pub eta: f64,
    pub s_noise: f64,
    /// The `_gpu` variant: Brownian noise drawn on the model's device (ComfyUI's `cpu=False` tree).
    pub gpu: bool,
    /// The `heun` solver type (`dpmpp_2m_sde_heun`) instead of the midpoint one.
    pub heun: bool,
}

impl Sampler for Dpmpp2mSde {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let mut bt = BrownianNoise::new(&x.size(), sigmas, cx.seed, cx.brownian_device(self.gpu))?;
        let mut old: Option<Tensor> = None;
        let mut h_last: Option<f64> = None;
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let mut h_now = h_last;
            if sigmas[i + 1] == 0.0 {
                x = denoised.shallow_clone();
            } else {
                let (ls, lt) = (-sigmas[i].ln(), -sigmas[i + 1].ln());
                let h = lt - ls;
                let h_eta = h * (self.eta + 1.0);
                let alpha_t = sigmas[i + 1] * lt.exp();
                let phi = -(-h_eta).exp_m1();
                x = &x * (sigmas[i + 1] / sigmas[i] * (-h * self.eta).exp()) + &denoised * (alpha_t * phi);
                if let (Some(prev), Some(hl)) = (&old, h_last) {
                    let r = hl / h;
                    let coeff = match self.heun {
                        true => alpha_t * (phi / -h_eta + 1.0) / r,
                        false => 0.5 * alpha_t * phi / r,
                    };
                    x = &x + (&denoised - prev) * coeff;
                }
                if self.eta > 0.0 && self.s_noise > 0.0 {
                    let scale = sigmas[i + 1] * (-(-2.0 * h * self.eta).exp_m1()).sqrt() * self.s_noise;
                    x = &x + bt.noise(sigmas[i], sigmas[i + 1])?.to_device(x.device()) * scale;
                }
                h_now = Some(h);
            }
            old = Some(denoised);
            h_last = h_now;
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
